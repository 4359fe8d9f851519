"""Length control: the length-conditional mask (the linguistic reward paid only while the
length ratio is in [0.5, 2]) against a linear penalty -lambda |ratio - 1| as a fourth reward,
and against none. The demo's SFT captions start short (its terse SFT set; the table's SFT
length ratio). The paper: without length control length drifts (there: shorter than the base
model's); a linear penalty is less balanced than masking.

The penalty's lambda is 1: c-GDPO normalises each reward within its group, so any positive
lambda gives the same advantages."""

from experiments import common
from experiments.spec import Arm, Claim

EXPERIMENT = common.ablation(
    name="length",
    description=__doc__,
    arms=(Arm("linear", ("--config.advantage.length_mask=False",
                         "--config.advantage.linear_length_penalty=1.0"),
              label="linear penalty"),
          Arm("no_length", ("--config.advantage.length_mask=False",),
              label="no length control")),
    claims=(Claim("Without length control the length drifts from the references'", "c_gdpo",
                  "no_length", "length_error", lower=True),
            Claim("Masking is more balanced than a linear penalty", "c_gdpo", "linear",
                  "b_capscore"),
            Claim("Masking keeps the length as close as a linear penalty does", "c_gdpo",
                  "linear", "length_error", lower=True)),
)
