// Stands in for the CUDA toolkit header of this name in the CPU emulation of the kernels.
#pragma once

#include "../cuda_emulation.h"
