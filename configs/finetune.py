r"""Fine-tuning a pretrained BrainLM encoder: `get_config(PRESET)` for tiny | 13m | 111m.

Run (from the repo root, with ../shared beside it; --checkpoint is a pretraining WORKDIR or one of
its WORKDIR/checkpoints/<step> directories):

  brainlm-finetune --config configs/finetune.py:tiny --checkpoint runs/tiny \
      --workdir runs/tiny/ft_subject_id
  brainlm-finetune --config configs/finetune.py:tiny --checkpoint runs/tiny \
      --workdir runs/tiny/ft_forecast --config.task.target=forecast
  brainlm-finetune --config configs/finetune.py:13m --checkpoint runs/13m \
      --workdir runs/13m/ft_age --config.task.target=age --config.data.phenotypes=participants.tsv

Tasks (`task.target`):
  subject-id   classification of which subject a window comes from: random windows from the first
               `data.train_fraction` of every recording train, non-overlapping windows of the rest
               test (as brainlm-probe's fingerprinting); works on the bundled HCP recordings.
  forecast     predict the last `task.forecast_patches` patches of every parcel from the preceding
               ones (the pretrained MAE with forecast masking: encoder + decoder are fine-tuned);
               train/test split by subject (`data.val_fraction`, pretraining's split by default).
  COLUMN       a phenotype column of `data.phenotypes` (CSV/TSV, one row per subject): regression
               or classification (`task.type`); one of `data.folds` subject folds is held out.
Model for subject-id / phenotypes: the pretrained encoder (all tokens visible), CLS or mean token
(`task.pooling`) -> MLP head (`task.head_hidden`, 0: linear). Baselines in the same run and
report: chance / majority class, a linear probe on functional connectivity on the same split,
and the same network fine-tuned from a random init with the same budget (`baselines.random_init`);
for forecasting the pretrained model before fine-tuning, persistence (repeat the last visible
patch) and the context mean.

Every field can be overridden with `--config.SECTION.KEY=VALUE`; unknown keys are an error.
`model.hidden_size/num_layers/num_heads/mlp_dim` = 0 accept any checkpoint; the 13m/111m presets
set them so a checkpoint of another shape fails at once, naming the mismatching parameters.

Measured (tiny pretrained 300 steps on the 7 HCP recordings; 2 CPU cores shared with other jobs,
load average 8-18, so wall times are pessimistic; CPU time is what the job itself used):
  subject-id, 300 steps + the random-init baseline (300 steps): 40.6 min wall, 8.0 min CPU.
    accuracy on the 21 held-out windows: fine-tuned 0.476, random-init 0.429, FC probe 1.000,
    chance 0.143.
  forecast (k=2 of 10 patches), 150 steps + the random-init baseline: 31 min wall, 6.0 min CPU.
    test MSE: fine-tuned 0.659 (R2 -0.003), before fine-tuning 0.667, random-init 0.659,
    persistence 1.320, context mean 0.689.
"""

import ml_collections

from configs import pretrain


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = (arg or "tiny").lower()
  if preset not in ("tiny", "13m", "111m"):
    raise ValueError(f"Unknown preset {arg!r}; choose one of ['111m', '13m', 'tiny']")
  small = preset == "tiny"
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0

  c.task = ml_collections.ConfigDict()
  c.task.target = "subject-id"  # subject-id | forecast | a column of data.phenotypes
  c.task.type = "auto"  # phenotype targets: auto | regression | classification
  c.task.pooling = "mean"  # mean (of the non-CLS tokens) | cls
  c.task.head_hidden = 64 if small else 256  # MLP hidden width; 0: a linear head
  c.task.head_dropout = 0.1
  c.task.forecast_patches = 2  # forecast: patches predicted at the end of every parcel

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # "": the pretraining run's data.path
  c.data.split = "auto"  # all | train | validation (the pretraining run's subjects); auto: all
  c.data.phenotypes = ""  # CSV/TSV with a subject column and the target column
  c.data.subject_column = "participant_id"
  c.data.train_fraction = 0.5  # subject-id: the first part of each recording trains
  c.data.folds = 5  # phenotype targets: 1 of `folds` subject folds is held out (stratified)
  c.data.val_fraction = 0.3  # forecast: held-out subjects (pretraining's split at the same seed)
  c.data.eval_batch_size = 16
  c.data.max_eval_windows = 0  # 0: every non-overlapping test window

  c.model = ml_collections.ConfigDict()
  # The expected architecture (0: whatever the checkpoint holds).
  sizes = pretrain.SIZES[preset]
  c.model.hidden_size = 0 if small else sizes[0]
  c.model.num_layers = 0 if small else sizes[1]
  c.model.num_heads = 0 if small else sizes[2]
  c.model.mlp_dim = 0 if small else sizes[3]
  # Run-time fields ("" / -1: as in the checkpoint).
  c.model.dropout = 0.0 if small else 0.1
  c.model.attention = ""
  c.model.dtype = ""
  c.model.remat = ""

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8 if small else 64
  c.train.num_steps = 300 if small else 5_000
  c.train.learning_rate = 1e-3 if small else 1e-4
  c.train.warmup_steps = 30 if small else 500
  c.train.end_lr_ratio = 0.05
  c.train.weight_decay = 0.05
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.grad_clip = 1.0
  c.train.layer_decay = 0.75  # ViT-style layer-wise lr decay (1.0: off)
  c.train.trainable_layers = -1  # -1: all; k >= 0: only the last k encoder blocks + head
  c.train.log_every = 25 if small else 100
  c.train.eval_every = 100 if small else 1_000
  c.train.checkpoint_every = 100 if small else 1_000
  c.train.keep_checkpoints = 2
  c.train.async_checkpoints = True

  c.baselines = ml_collections.ConfigDict()
  c.baselines.random_init = True  # the same fine-tuning from a random init (same budget)
  c.baselines.fc = True  # linear probe on functional connectivity (classification/regression)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1 if preset in ("tiny", "13m") else 1
  c.mesh.fsdp = 1 if preset in ("tiny", "13m") else -1
  c.mesh.tensor = 1
  c.mesh.num_devices = 0
  return c
