// Stands in for c10/cuda/CUDAGuard.h in the CPU emulation of the kernels.
#pragma once

#include "../../../cuda_emulation.h"
