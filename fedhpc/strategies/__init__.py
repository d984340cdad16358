"""Federated LoRA methods, one module each, registered by name."""
from . import (cluster_fedit, fedex_lora, fedit, fedsa_lora, ffa_lora, flexlora, flora, hetlora, hilora,  # noqa: F401
               ilora, local, lora_fair)  # (registration)
from . import fedtreelora  # noqa: F401  (registration)
from . import exclusive, fedhello, fedra  # noqa: F401  (registration)
from . import fedavg_full, fedgalore  # noqa: F401  (registration)
from .base import Population, RoundPlan, Strategy, StrategyConfig, build_strategy, list_strategies, register_strategy

__all__ = ["Population", "RoundPlan", "Strategy", "StrategyConfig", "build_strategy", "list_strategies",
           "register_strategy"]
