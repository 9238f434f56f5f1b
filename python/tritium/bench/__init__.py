"""The benchmark harness behind ``tritium bench``.

Suites: ``ops`` (every op case declared in tritium.bench.suites.*), and any module registered in SUITES that
defines ``add_arguments(parser)`` and ``run(args)`` (``generate``, ``models``, ...).
"""
SUITES = {
    "ops": "tritium.bench.ops",
    "generate": "tritium.bench.generate",
    "models": "tritium.bench.models",
    "memory": "tritium.bench.memory",
    "hf": "tritium.bench.hf",
    "serve": "tritium.bench.serve",
    "optim": "tritium.bench.optim",
    "finetune": "tritium.bench.finetune",
    "dist": "tritium.bench.dist",
}
