// The one translation unit charlm/model/native.py compiles: every file of this folder, included
// in turn. Each file is a job of its own to read and change; compiled together, the ATen headers
// they all need are parsed once (as six units they took about four times the compiler's time).
#include "gru_loops.cpp"
#include "weight_grads.cpp"
#include "decoding.cpp"
#include "dropout.cpp"
#include "log_softmax.cpp"
#include "ops.cpp"
