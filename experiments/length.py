"""Length control: the length-conditional mask (the linguistic reward paid only while the
length ratio is in [0.5, 2]) against a linear penalty -lambda |ratio - 1| as a fourth reward,
and against none. The demo's SFT captions start short (its terse SFT set; the table's SFT
length ratio). Two more arms start from an SFT policy without the terse set, whose captions
run far longer than the references (CapWorld's flawed captions ramble and repeat), with the
mask and with the linear penalty. The paper: without length control length drifts (there:
shorter than the base model's); a linear penalty is less balanced than masking, the more so
the farther the starting length is from the reference's.

The penalty's lambda is 1: c-GDPO normalises each reward within its group, so any positive
lambda gives the same advantages."""

from experiments import common
from experiments.spec import Arm, Claim

_LINEAR = ("--config.advantage.length_mask=False", "--config.advantage.linear_length_penalty=1.0")
# The SFT set without terse captions: its policy starts long (the summary's SFT length ratio).
_LONG_START = ("--config.data.capworld.terse_share=0",)

EXPERIMENT = common.ablation(
    name="length",
    description=__doc__,
    arms=(Arm("linear", _LINEAR, label="linear penalty"),
          Arm("no_length", ("--config.advantage.length_mask=False",),
              label="no length control"),
          Arm("long_mask", sft_flags=_LONG_START, label="mask, long start"),
          Arm("long_linear", _LINEAR, sft_flags=_LONG_START, label="linear penalty, long start")),
    claims=(Claim("Without length control the length drifts from the references'", "c_gdpo",
                  "no_length", "length_error", lower=True),
            Claim("Masking is more balanced than a linear penalty", "c_gdpo", "linear",
                  "b_capscore"),
            Claim("Masking keeps the length closer to the references' than a linear penalty",
                  "c_gdpo", "linear", "length_error", lower=True),
            Claim("From a long start, masking is more balanced than a linear penalty",
                  "long_mask", "long_linear", "b_capscore"),
            Claim("From a long start, masking brings the length closer than a linear penalty",
                  "long_mask", "long_linear", "length_error", lower=True)),
)
