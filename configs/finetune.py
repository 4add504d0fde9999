r"""Fine-tuning a pretrained BrainLM encoder: `get_config(PRESET)` for tiny | abide | 13m | 111m.

Run (from the repo root, with ../shared beside it; --checkpoint is a pretraining WORKDIR or one of
its WORKDIR/checkpoints/<step> directories):

  brainlm-finetune --config configs/finetune.py:tiny --checkpoint runs/tiny \
      --workdir runs/tiny/ft_subject_id
  brainlm-finetune --config configs/finetune.py:tiny --checkpoint runs/tiny \
      --workdir runs/tiny/ft_forecast --config.task.target=forecast
  brainlm-finetune --config configs/finetune.py:13m --checkpoint runs/13m \
      --workdir runs/13m/ft_age --config.task.target=age --config.data.phenotypes=participants.tsv
  brainlm-finetune --config configs/finetune.py:abide --cv site \
      --checkpoint runs/abide_s0,runs/abide_s1,runs/abide_s2 --workdir runs/abide_ft/dx \
      --config.task.strategies=linear,full,lp-ft

Tasks (`task.target`):
  subject-id   classification of which subject a window comes from: random windows from the first
               `data.train_fraction` of every recording train, non-overlapping windows of the rest
               test (as brainlm-probe's fingerprinting); works on the bundled HCP recordings.
  forecast     predict the last `task.forecast_patches` patches of every parcel from the preceding
               ones (the pretrained MAE with forecast masking: encoder + decoder are fine-tuned);
               train/test split by subject (`data.val_fraction`, pretraining's split by default).
  COLUMN       a phenotype column of `data.phenotypes` (CSV/TSV, one row per subject), or with
               `--cv site|kfold` of the cohort folder's table: regression or classification
               (`task.type`); `data.subset` (e.g. DX_GROUP=1) keeps some subjects only.
Schemes (`data.cv`, or --cv):
  holdout      one of `data.folds` subject folds is held out (stratified); one init and its
               random-init baseline (`baselines.random_init`), a linear probe on FC, chance.
  site, kfold  transfer/finetune_cv.py: leave one site (or one of `data.site_folds` groups of
               whole sites) out, or `data.folds` folds by label x site; validation sites inside
               every training fold pick the step (early stopping) and the pooling; the
               `task.strategies` (linear, full, lp-ft, top, bottom, aux-mae), each from every
               --checkpoint and `baselines.random_seeds` random inits, for `train.seeds` seeds;
               fc, tangent, site and chance on the same folds; paired tests.
Model for subject-id / phenotypes: the pretrained encoder (all tokens visible), the CLS token, the
mean token or the patch tokens' parcel x parcel correlation (`task.pooling`) -> an MLP head
(`task.head_hidden`, 0: linear). Forecasting is compared with the pretrained model before
fine-tuning, persistence (repeat the last visible patch) and the context mean.

Every field can be overridden with `--config.SECTION.KEY=VALUE`; unknown keys are an error.
`model.hidden_size/num_layers/num_heads/mlp_dim` = 0 accept any checkpoint; the 13m/111m presets
set them so a checkpoint of another shape fails at once, naming the mismatching parameters.

Earlier held-out-fold measurements (the old masking): docs/results/finetune_holdout.md.

The `abide` preset: the `abide` pretraining runs on ABIDE I's DX_GROUP, leave one of 4 groups
of whole sites out (16 sites; each group's sites hold about a quarter of the subjects), a
linear head on `patches-fc`, 100 steps of 16 windows, validation every 50 steps.
Measured (2026-12-07/08, 2 CPU cores; docs/results/abide_finetune.md): the command above,
three pretraining runs against three random inits, about 80 min from scratch (25 min linear,
29 min full, 21 min lp-ft, 3 min baselines), peak RSS 5.9 GB. DX accuracy: linear 0.580
pretrained / 0.602 random init, full 0.539 / 0.548, lp-ft 0.583 / 0.602; fc 0.657, tangent
0.659. AGE_AT_SCAN (linear, ~45 min): R2 0.125 / 0.205, fc 0.438. ADOS_TOTAL within autism
(linear, 29 min): no row, FC included, beats its permutation null.
"""

import ml_collections

from configs import pretrain


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = (arg or "tiny").lower()
  if preset not in ("tiny", "abide", "13m", "111m"):
    raise ValueError(f"Unknown preset {arg!r}; choose one of ['111m', '13m', 'abide', 'tiny']")
  small = preset in ("tiny", "abide")
  abide = preset == "abide"
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0

  c.task = ml_collections.ConfigDict()
  c.task.target = "DX_GROUP" if abide else "subject-id"  # | forecast | a phenotype column
  c.task.type = "auto"  # phenotype targets: auto | regression | classification
  # cls | mean (of the non-CLS tokens) | patches-fc (heads.py); several, comma-separated: chosen
  # per fold by the inner validation (--cv site|kfold)
  c.task.pooling = "patches-fc" if abide else "mean"
  c.task.head_hidden = 0 if abide else 64 if small else 256  # MLP hidden width; 0: linear
  c.task.head_dropout = 0.1
  c.task.forecast_patches = 2  # forecast: patches predicted at the end of every parcel
  # cv: strategies compared on the same folds (finetune_cv.STRATEGIES), comma-separated.
  c.task.strategies = "full"
  c.task.aux_mae_weight = 0.5  # the aux-mae strategy's weight of the reconstruction loss

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # "": the pretraining run's data.path
  c.data.split = "auto"  # all | train | validation (the pretraining run's subjects); auto: all
  c.data.phenotypes = ""  # CSV/TSV with a subject column and the target column
  c.data.subject_column = "participant_id"
  c.data.train_fraction = 0.5  # subject-id: the first part of each recording trains
  c.data.folds = 5  # phenotype targets: 1 of `folds` subject folds is held out (stratified)
  c.data.val_fraction = 0.3  # forecast: held-out subjects (pretraining's split at the same seed)
  c.data.cv = "site" if abide else "holdout"  # holdout (the above) | site | kfold (transfer/finetune_cv.py)
  c.data.site_folds = 4 if abide else 0  # cv=site: 0 leaves one site out; k: one of k groups of whole sites
  c.data.inner_val_fraction = 0.2  # cv: validation subjects (whole sites) in each training fold
  c.data.subset = ""  # cv: COLUMN=VALUE keeps those subjects (e.g. DX_GROUP=1: autism only)
  c.data.eval_batch_size = 32 if abide else 16
  c.data.max_eval_windows = 0  # 0: every non-overlapping test window

  c.model = ml_collections.ConfigDict()
  # The expected architecture (0: whatever the checkpoint holds).
  sizes = pretrain.SIZES["tiny" if small else preset]
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
  c.train.batch_size = 16 if abide else 8 if small else 64
  c.train.num_steps = 100 if abide else 300 if small else 5_000
  c.train.learning_rate = 1e-3 if small else 1e-4
  c.train.warmup_steps = 10 if abide else 30 if small else 500
  c.train.end_lr_ratio = 0.05
  c.train.weight_decay = 0.05
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.grad_clip = 1.0
  c.train.layer_decay = 0.75  # ViT-style layer-wise lr decay (1.0: off)
  c.train.trainable = "all"  # all | head | top:K | bottom:K (heads.parse_trainable)
  c.train.seeds = 1  # cv: fine-tuning seeds per init (data order, head, dropout)
  c.train.lp_steps = 100 if abide else 300 if small else 1_000  # cv: the linear head's steps (linear, lp-ft)
  # cv: the linear head's peak learning rate; several, comma-separated: chosen by validation
  c.train.lp_learning_rate = "3e-3,3e-2" if abide else "3e-3"
  c.train.partial_layers = 1  # cv: blocks the top / bottom strategies train
  c.train.aux_mae_weight = 0.0  # + this x the masked-reconstruction loss (aux-mae sets it)
  c.train.log_every = 25 if small else 100
  c.train.eval_every = 50 if abide else 100 if small else 1_000
  c.train.checkpoint_every = 50 if abide else 100 if small else 1_000
  c.train.keep_checkpoints = 2
  c.train.async_checkpoints = True

  c.baselines = ml_collections.ConfigDict()
  c.baselines.random_init = True  # the same fine-tuning from a random init (same steps)
  c.baselines.fc = True  # linear probe on functional connectivity (classification/regression)
  c.baselines.random_seeds = 3  # cv: random-init encoders fine-tuned beside the pretrained
  c.baselines.tangent = True  # cv: the tangent-space FC baseline

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1 if preset in ("tiny", "13m") else 1
  c.mesh.fsdp = 1 if preset in ("tiny", "13m") else -1
  c.mesh.tensor = 1
  c.mesh.num_devices = 0
  return c
