/* emulator stand-in for the CUDA header of this name (tests/gpu/emu/run.sh) */
#include "emu.h"
