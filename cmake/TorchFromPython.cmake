# Imported targets for the libtorch that ships inside the torch package of a Python environment.
#
# torch's own TorchConfig.cmake drags in its CUDA toolkit checks (a CUDA build of torch demands a
# matching toolkit and cuDNN at configure time) and links everything through libtorch.so, which pulls
# in the CUDA libraries even for a CPU-only build. The C++ library needs far less: the headers, the
# CPU and c10 libraries, and the C++ ABI torch was built with. Python knows all three.
#
# Input:  Python_EXECUTABLE (an interpreter whose environment has torch; found by find_package(Python)).
# Output: mmv::torch_cpu (libtorch_cpu + c10), mmv::torch_cuda (libtorch_cuda + c10_cuda + the CPU part;
#         only for a CUDA build of torch), MMV_TORCH_VERSION, MMV_TORCH_CUDA_VERSION (empty: CPU-only).

include_guard(GLOBAL)

find_package(Python REQUIRED COMPONENTS Interpreter)

# torch's include and library folders are fixed relative to the package; asking
# torch.utils.cpp_extension instead would cost a CUDA probe and a warning on machines without a GPU.
set(_mmv_torch_query [=[
import os, torch
root = os.path.dirname(torch.__file__)
print(";".join([
    torch.__version__,
    torch.version.cuda or "",
    str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
    os.path.join(root, "include"),
    os.path.join(root, "include", "torch", "csrc", "api", "include"),
    os.path.join(root, "lib"),
]))
]=])
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "${_mmv_torch_query}"
  OUTPUT_VARIABLE _mmv_torch_facts
  ERROR_VARIABLE _mmv_torch_error
  RESULT_VARIABLE _mmv_torch_result
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _mmv_torch_result EQUAL 0)
  message(FATAL_ERROR
    "Python_EXECUTABLE=${Python_EXECUTABLE} cannot import torch:\n${_mmv_torch_error}\n"
    "Pass -DPython_EXECUTABLE=<the python of an environment that has torch>.")
endif()

list(GET _mmv_torch_facts 0 MMV_TORCH_VERSION)
list(GET _mmv_torch_facts 1 MMV_TORCH_CUDA_VERSION)
list(GET _mmv_torch_facts 2 _mmv_torch_cxx11_abi)
list(SUBLIST _mmv_torch_facts 3 2 _mmv_torch_include_dirs)
list(GET _mmv_torch_facts 5 _mmv_torch_lib_dir)
message(STATUS "torch ${MMV_TORCH_VERSION} (CUDA: ${MMV_TORCH_CUDA_VERSION}) from ${_mmv_torch_lib_dir}")

function(_mmv_import_torch_library target file)
  set(location "${_mmv_torch_lib_dir}/${file}")
  if(NOT EXISTS "${location}")
    message(FATAL_ERROR "torch ${MMV_TORCH_VERSION} has no ${location}")
  endif()
  add_library(${target} SHARED IMPORTED GLOBAL)
  set_target_properties(${target} PROPERTIES IMPORTED_LOCATION "${location}")
endfunction()

_mmv_import_torch_library(mmv::c10 libc10.so)
set_target_properties(mmv::c10 PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${_mmv_torch_include_dirs}"
  # Objects built with another std::string ABI than torch's fail to link, or crash at run time.
  INTERFACE_COMPILE_DEFINITIONS "_GLIBCXX_USE_CXX11_ABI=${_mmv_torch_cxx11_abi}")
_mmv_import_torch_library(mmv::torch_cpu libtorch_cpu.so)
set_target_properties(mmv::torch_cpu PROPERTIES INTERFACE_LINK_LIBRARIES mmv::c10)

if(MMV_TORCH_CUDA_VERSION)
  _mmv_import_torch_library(mmv::c10_cuda libc10_cuda.so)
  set_target_properties(mmv::c10_cuda PROPERTIES INTERFACE_LINK_LIBRARIES mmv::c10)
  _mmv_import_torch_library(mmv::torch_cuda libtorch_cuda.so)
  set_target_properties(mmv::torch_cuda PROPERTIES INTERFACE_LINK_LIBRARIES "mmv::torch_cpu;mmv::c10_cuda")
endif()
