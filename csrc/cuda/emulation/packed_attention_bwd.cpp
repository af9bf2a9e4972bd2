// The unmodified kernel source, compiled as C++ for the CUDA emulator (cuda_emulation.h is forced in
// front of it).
#include "../packed_attention_bwd.cu"
