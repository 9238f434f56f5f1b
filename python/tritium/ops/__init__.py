"""tritium ops: schemas, fake kernels, autograd, validation, and the public functional API.

One module per op family; each lists its public functions in ``__all__`` and gets one line here.
"""
import torch  # noqa: F401  (loads libtorch before the extension)
from .. import _kernels  # noqa: F401  (the C++ CPU kernels; they register for the schemas the modules define)
from .norms import *  # noqa: F401,F403
from . import norms as _norms

__all__ = list(_norms.__all__)
from .rnn import *  # noqa: F401,F403,E402
from . import rnn as _rnn  # noqa: E402
__all__ += _rnn.__all__
from .activations import *  # noqa: F401,F403,E402
from . import activations as _activations  # noqa: E402
__all__ += _activations.__all__
from .attention import *  # noqa: F401,F403,E402
from . import attention as _attention  # noqa: E402
__all__ += _attention.__all__
from .paged import *  # noqa: F401,F403,E402
from . import paged as _paged  # noqa: E402
__all__ += _paged.__all__
from .sampling import *  # noqa: F401,F403,E402
from . import sampling as _sampling  # noqa: E402
__all__ += _sampling.__all__
from . import softmax as _softmax  # noqa: E402  (module first: the star import binds the name to the function)
from .softmax import *  # noqa: F401,F403,E402
__all__ += _softmax.__all__
from . import cross_entropy as _cross_entropy  # noqa: E402  (module first, as above)
from .cross_entropy import *  # noqa: F401,F403,E402
__all__ += _cross_entropy.__all__
from . import rope as _rope  # noqa: E402  (before the star import: the function tritium.ops.rope shadows the module)
from .rope import *  # noqa: F401,F403,E402
__all__ += _rope.__all__
from . import linear as _linear  # noqa: E402  (module first, as above: the function tritium.ops.linear shadows it)
from .linear import *  # noqa: F401,F403,E402
__all__ += _linear.__all__
from . import quant as _quant  # noqa: E402
from .quant import *  # noqa: F401,F403,E402
__all__ += _quant.__all__
from . import serve as _serve  # noqa: E402,F401  (serve_decode: the model's decode step, not a public function)
from . import preference as _preference  # noqa: E402
from .preference import *  # noqa: F401,F403,E402
__all__ += _preference.__all__
from . import losses as _losses  # noqa: E402
from .losses import *  # noqa: F401,F403,E402
__all__ += _losses.__all__
from . import optim as _optim  # noqa: E402,F401  (the optimizer steps: tritium.optim's ops, not public functions)
from . import ssm as _ssm  # noqa: E402
from .ssm import *  # noqa: F401,F403,E402
__all__ += _ssm.__all__
from . import conv1d as _conv1d  # noqa: E402
from .conv1d import *  # noqa: F401,F403,E402
__all__ += _conv1d.__all__
from . import lora as _lora  # noqa: E402
from .lora import *  # noqa: F401,F403,E402
__all__ += _lora.__all__
from . import wkv as _wkv  # noqa: E402
from .wkv import *  # noqa: F401,F403,E402
__all__ += _wkv.__all__
from . import nf4 as _nf4  # noqa: E402
from .nf4 import *  # noqa: F401,F403,E402
__all__ += _nf4.__all__
from . import moe as moe_ops  # noqa: E402
from .moe import *  # noqa: F401,F403,E402
__all__ += moe_ops.__all__
from . import kan as _kan  # noqa: E402
from .kan import *  # noqa: F401,F403,E402
__all__ += _kan.__all__
from . import wavenet as _wavenet  # noqa: E402
from .wavenet import *  # noqa: F401,F403,E402
__all__ += _wavenet.__all__
from . import pooling as _pooling  # noqa: E402
from .pooling import *  # noqa: F401,F403,E402
__all__ += _pooling.__all__
from . import graph as _graph  # noqa: E402
from .graph import *  # noqa: F401,F403,E402
__all__ += _graph.__all__
from . import mlstm as _mlstm  # noqa: E402
from .mlstm import *  # noqa: F401,F403,E402
__all__ += _mlstm.__all__
from . import slstm as _slstm  # noqa: E402
from .slstm import *  # noqa: F401,F403,E402
__all__ += _slstm.__all__
from . import _autocast  # noqa: E402  (last: torch.autocast's casts for the functions its table names)
for _name in _autocast.AUTOCAST:
    globals()[_name] = _autocast.wrap(_name, globals()[_name])
del _name
