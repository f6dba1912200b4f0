"""Baseline PTQ methods, one file each. Each registers here by name with a lazy
``"module:attr"`` entry, which ``bench.registry.METHODS`` includes; nothing is imported until
a method is used."""

BASELINES: dict[str, str] = {
    "linear": "baselines.linear_quant:METHOD",
    "nncf-ptq": "baselines.nncf_ptq:METHOD",
    "ptq4dm": "baselines.ptq4dm:METHOD",
    "ptqd": "baselines.ptqd:METHOD",
    "ptqd-mp": "baselines.ptqd:MIXED",
    "smoothquant": "baselines.smoothquant:METHOD",
    "svdquant": "baselines.svdquant:METHOD",
    "torchao-int8dq": "baselines.torchao_presets:INT8_DYNAMIC",
    "torchao-int8wo": "baselines.torchao_presets:INT8_WEIGHT_ONLY",
    "torchao-int4wo": "baselines.torchao_presets:INT4_WEIGHT_ONLY",
    "torchao-intx4wo": "baselines.torchao_presets:INTX4_WEIGHT_ONLY",
}
