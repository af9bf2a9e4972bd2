// The op schemas of csrc/ops.cpp, registered for the CUDA emulator under mmv_emulated.
#include "../../ops.cpp"
