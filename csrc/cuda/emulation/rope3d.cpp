// The unmodified kernel source, compiled as C++ for the CUDA emulator (cuda_emulation.h is forced in
// front of it).
#include "../rope3d.cu"
