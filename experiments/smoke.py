"""The runner's smoke test (tests/test_experiments.py): 2 arms x 1 seed of a few steps each,
end to end through the runner, the aggregate and the plots. Not an experiment to read."""

from experiments.spec import Arm, Claim, Experiment

# configs/tiny.py at test size: 40 training images, a few steps of SFT and RL (no vision
# pre-training: its own tests cover it).
_TINY = (
    "--config.data.capworld.num_train=40", "--config.data.capworld.num_validation=4",
    "--config.data.capworld.num_test=4", "--config.vision_pretrain.num_steps=0",
    "--config.sft.num_steps=3", "--config.sft.batch_size=4",
    "--config.sft.optimizer.warmup_steps=1", "--config.sft.image_gain_every=0",
    "--config.rl.optimizer.warmup_steps=1", "--config.rl.num_steps=2",
    "--config.rl.batch_size=2", "--config.rl.group_size=4", "--config.rl.sample_table_every=2",
    "--config.sampling.max_new_tokens=8", "--config.rl.final_eval_examples=4",
    "--config.batch_size=4", "--config.checkpoint.every_steps=1",
    "--config.metrics.log_every_steps=1", "--config.metrics.progress_bar=False")

EXPERIMENT = Experiment(
    name="smoke",
    description="Two advantage estimators on CapWorld at test size.",
    base="configs/tiny.py",
    flags=_TINY,
    seeds=(0,),
    arms=(Arm("c_gdpo", label="c-GDPO"),
          Arm("grpo", ("--config.advantage.estimator=grpo",), label="GRPO")),
    claims=(Claim("c-GDPO beats GRPO on b-CapScore", "c_gdpo", "grpo", "b_capscore"),),
)
