// The op schemas of mmv, declared once for every backend, and the (empty) Python module mmv._C whose
// import loads this library and so registers the ops with PyTorch's dispatcher.
//
// Kernels register under dispatch keys in csrc/cpu/ and csrc/cuda/; autograd and fake (meta) kernels
// are registered from Python in mmv/ops/.
#include <torch/library.h>

#ifdef MMV_PYTHON_MODULE
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "mmv's compiled ops; they are reached through torch.ops.mmv and mmv.ops.",
      -1,       // size of per-interpreter state
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(mmv, m) {
  m.def("rope3d(Tensor x, Tensor coords, Tensor freqs, int[] sections, bool interleaved=False) -> Tensor");
  // validate: check the values of cu_seqlens (a host copy on GPUs). deterministic is only read by
  // the backward, which autograd gives the forward's arguments. max_seqlen is a SymInt so that
  // torch.compile keeps it symbolic (the kernels take it as int64_t, which the dispatcher allows).
  m.def(
      "packed_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, float scale, "
      "bool validate=True, bool deterministic=False) -> (Tensor out, Tensor lse)");
  m.def(
      "packed_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens, SymInt max_seqlen, float scale, bool validate=True, bool deterministic=False) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}
