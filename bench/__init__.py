"""The qdiff-bench harness."""

import logging

# Importing diffusers imports torchao when it is installed; torchao 0.18 under torch 2.14 logs
# a deprecation warning per enum it registers, and diffusers one about torchao tensor classes
# it cannot import. Neither affects this suite (it calls torchao's quantize_ API only), and
# every worker process would print them.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)
