// The Python module tritium._C. Importing it registers every CPU kernel (each csrc/*.cpp adds its own
// TORCH_LIBRARY_IMPL(tritium, CPU, ...) block); the schemas are defined in python/tritium/ops/.
#include <Python.h>
#include <ATen/Parallel.h>

static PyMethodDef methods[] = {{nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "tritium CPU kernels", -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
