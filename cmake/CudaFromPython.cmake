# Enables CMake's CUDA language with the toolkit that setup.py would use.
#
# The nvcc on PATH may be a wrapper script whose folder holds no CUDA libraries; cmake/cuda_home.py
# follows it to the real toolkit (the same answer setup.py gets). An explicit CMAKE_CUDA_COMPILER or
# CUDA_HOME wins. Architectures come from CMAKE_CUDA_ARCHITECTURES, by default 90 (H100) only,
# which keeps the compile on CPU-only CI machines short.
#
# Input:  Python_EXECUTABLE. Output: the CUDA language, CUDA::cudart, MMV_CUDA_FLAGS (the nvcc flags
#         torch.utils.cpp_extension uses, so that torch's headers compile the same way here).

include_guard(GLOBAL)

find_package(Python REQUIRED COMPONENTS Interpreter)

if(NOT CMAKE_CUDA_COMPILER)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/cuda_home.py"
    OUTPUT_VARIABLE _mmv_cuda_home
    ERROR_VARIABLE _mmv_cuda_error
    RESULT_VARIABLE _mmv_cuda_result
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _mmv_cuda_result EQUAL 0 OR NOT EXISTS "${_mmv_cuda_home}/bin/nvcc")
    message(FATAL_ERROR "MMV_WITH_CUDA=ON but no CUDA toolkit was found (${_mmv_cuda_error}). "
                        "Put nvcc on PATH, set CUDA_HOME, or pass -DCMAKE_CUDA_COMPILER=<nvcc>.")
  endif()
  set(CMAKE_CUDA_COMPILER "${_mmv_cuda_home}/bin/nvcc" CACHE FILEPATH "nvcc of the CUDA toolkit")
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "GPU architectures to compile the CUDA kernels for")
endif()
# torch's libraries load the shared CUDA runtime; a second, static copy would hold its own state.
set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

# -std=c++20 by hand: torch's headers need it, and CMake before 3.26 has no CUDA20 dialect for nvcc.
set(MMV_CUDA_FLAGS
  -std=c++20 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr -lineinfo)
