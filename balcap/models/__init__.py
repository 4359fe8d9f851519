"""balcap's policies: pure-functional Flax ports of Qwen2.5-VL (and LLaVA-1.5) behind one interface.

    from balcap import models
    policy = models.load_pretrained(folder, dtype="bfloat16", mesh=mesh)
    logits = policy.apply(policy.params, policy.processor(prompts=[...], images=[...]))
"""

from balcap.models import llava, qwen_vl  # registers the LLaVA-1.5 and Qwen2.5-VL families
from balcap.models.policy import (Family, Policy, architecture_from_config, family_of,
                                  init_random, load_pretrained, policy_from_config)

__all__ = ["Family", "Policy", "architecture_from_config", "family_of", "init_random",
           "llava", "load_pretrained", "policy_from_config", "qwen_vl"]
