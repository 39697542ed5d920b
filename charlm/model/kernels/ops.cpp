// The ops every other file of this folder defines, registered with PyTorch as
// torch.ops.<namespace>.<name>: the namespace names the build (charlm_avx2, charlm_portable, ...;
// native.py passes -DCHARLM_LIBRARY_NS), so that several builds load into one process side by
// side, as the tests and the kernel benchmark load them.
#include <torch/library.h>

#include <atomic>

#include "kernels.h"

#ifndef CHARLM_LIBRARY_NS
#define CHARLM_LIBRARY_NS charlm
#endif
// TORCH_LIBRARY pastes its first argument into names: expand the macro first.
#define CHARLM_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

namespace charlm {
namespace {

// How many threads the parallel loops above run on: at::parallel_for is compiled into this file, and
// without OpenMP (-fopenmp) it would run every loop on one thread.
int64_t threads() {
  std::atomic<int64_t> most{1};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int64_t mine = at::get_thread_num() + 1;
    int64_t seen = most.load();
    while (mine > seen && !most.compare_exchange_weak(seen, mine)) {
    }
  });
  return most.load();
}

}  // namespace
}  // namespace charlm

CHARLM_LIBRARY(CHARLM_LIBRARY_NS, m) {
  using namespace charlm;

  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
  m.def("mm_tn", &mm_tn);
  m.def("tn_kernel", &tn_kernel);
  m.def("gru_decode", &gru_decode);
  m.def("gemv_layout", &gemv_layout);
  m.def("draw", &draw);
  m.def("gru_write", &gru_write);
  m.def("dropout_mask", &dropout_mask);
  m.def("log_softmax_rows", &log_softmax_rows);
  m.def("log_softmax_rows_backward", &log_softmax_rows_backward);
  m.def("threads", &threads);
  m.def("recurrent_matmul", &recurrent_matmul);
}

