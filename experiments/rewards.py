"""The rewards, one left out at a time, and precision without pointability (CapWorldJudge
counting commentary as no assertion). The paper: without pointability the policy learns
meta-commentary; without the linguistic reward captions get long and list-like.

Leaving out precision or recall also drops the demo's GDPO conditioning (precision paid only
when recall >= 0.5), which needs both; leaving out the linguistic reward drops the length
mask, which gates that reward."""

from experiments import common
from experiments.spec import Arm, Claim

_NO_CONDITION = ("--config.advantage.conditioned=", "--config.advantage.condition_on=")

EXPERIMENT = common.ablation(
    name="rewards",
    description=__doc__,
    arms=(Arm("no_precision", ("--config.advantage.components=('recall','linguistic')",
                               "--config.advantage.weights=(1.0,1.0)", *_NO_CONDITION),
              label="no precision"),
          Arm("no_recall", ("--config.advantage.components=('precision','linguistic')",
                            "--config.advantage.weights=(1.0,1.0)", *_NO_CONDITION),
              label="no recall"),
          Arm("no_linguistic", ("--config.advantage.components=('precision','recall')",
                                "--config.advantage.weights=(1.0,1.0)",
                                "--config.advantage.length_mask=False"),
              label="no linguistic"),
          Arm("no_pointability", ("--config.rewards.capworld.pointability=False",),
              label="precision without pointability")),
    claims=(Claim("Without pointability the policy learns meta-commentary", "c_gdpo",
                  "no_pointability", "meta", lower=True),
            Claim("Without the linguistic reward captions read worse", "c_gdpo",
                  "no_linguistic", "linguistic"),
            Claim("Without the linguistic reward captions get long", "c_gdpo",
                  "no_linguistic", "words", lower=True),
            Claim("Without the precision reward precision falls", "c_gdpo", "no_precision",
                  "precision"),
            Claim("Without the recall reward recall falls", "c_gdpo", "no_recall", "recall")),
)
