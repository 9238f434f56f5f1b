// The Python module tritium._C_<width> (setup.py builds one per vector width; tritium/_kernels.py imports the one
// this CPU runs). Importing it registers every CPU kernel (each csrc/*.cpp adds its own
// TORCH_LIBRARY_IMPL(tritium, CPU, ...) block); the schemas are defined in python/tritium/ops/.
#include <Python.h>
#include <ATen/Parallel.h>

#define TRITIUM_STR2(x) #x
#define TRITIUM_STR(x) TRITIUM_STR2(x)
#define TRITIUM_CAT2(a, b) a##b
#define TRITIUM_CAT(a, b) TRITIUM_CAT2(a, b)

static PyMethodDef methods[] = {{nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, TRITIUM_STR(TORCH_EXTENSION_NAME), "tritium CPU kernels",
                                    -1, methods};
PyMODINIT_FUNC TRITIUM_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
