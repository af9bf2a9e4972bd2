// MMV_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...) launches `kernel`, the last macro
// argument so that a template-id with commas passes whole. Under nvcc it is the plain
// kernel<<<grid, block, shared_bytes, stream>>>(args...); the CPU emulation of the kernels
// (emulation/cuda_emulation.h) defines it to run the kernel on its SIMT emulator instead.
#pragma once

#ifndef MMV_CUDA_EMULATION
#define MMV_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif
