r"""Pretraining configs: `get_config(PRESET)` for tiny | abide | hcp | 13m | 111m | 650m | 1b (BrainLM's
masked autoencoder) and abide_conn | hcp_conn (the connectivity objective, docs/objectives.md).

Run (from the repo root, with ../shared beside it):

  brainlm-pretrain --config configs/pretrain.py:tiny --workdir runs/tiny
  brainlm-pretrain --config configs/pretrain.py:hcp --workdir runs/hcp --config.seed=1
  brainlm-pretrain --config configs/pretrain.py:13m --workdir runs/13m \
      --config.data.path=/data/ukb_a424_parcels --config.train.batch_size=256

Every field can be overridden with `--config.SECTION.KEY=VALUE`; unknown keys are an error.
Every preset masks BrainLM's way (`uniform`: a random subset of all tokens) and holds out the
same subjects whatever its seed (`data.split_seed`), so runs of several seeds compare.

Presets (parameter counts measured by tests/test_configs.py; the paper names its sizes after the
same ViT-MAE widths/depths, with Nystromformer layers where we use exact attention). Costs are
wall-clock on 2 CPU cores, evals and checkpoints included:
  tiny  0.13M   CPU demo on the bundled HCP recordings (94 AAL regions, no coordinates ->
        learned parcel table). 1,000 steps of 8, mask 0.5: 2.6 min alone on 2 CPU cores (2026-12-08), ~6 shared; eval R2
        0.35 / 0.39 / 0.40 (seeds 0 / 1 / 2, 2026-12-07).
  abide 0.14M   ABIDE I (../shared/data/abide_cc200: 789 subjects, 16 sites, CC200, no
        coordinates -> learned parcel table), every recording resampled to TR 2.0 s (site TRs
        1.5-3.0 s, from its site_tr.csv), windows of 30 timepoints (60 s; ABIDE's shortest
        scan, 78 x 2.5 s = 195 s, gives three) in patches of 10 (20 s) -> 200 x 3 = 600 tokens;
        each recording scaled by its own IQR (16 scanners); uniform masking 0.5; 5,000 steps of
        16 (docs/results/abide.md: short windows and many steps is what left the
        masked-autoencoder plateau on 2 CPU cores). 16-28 min on 2 cores (2026-12-07; eval
        R2 on 940 windows of all 236 validation recordings: 0.146 / 0.032 / 0.016 for seeds
        0 / 1 / 2: whether a run leaves the plateau depends on the seed).
  hcp   0.12M   HCP-100 (../shared/data/hcp100_dk68: 70 subjects x 4 runs of 1,200 TRs, 68
        Desikan-Killiany regions, subjects from its scans.csv), windows of 200 in patches of 20
        (BrainLM's), uniform masking 0.5, 6,000 steps of 16. 22 min alone on 2 cores, ~40 min
        sharing them with a probe (2026-12-07; eval R2 0.266 / 0.265 / 0.272 for seeds 0 / 1 /
        2 on 336 windows of the 21 held-out subjects). Probed in docs/results/hcp_crossday.md.
  hcp_conn, abide_conn  the same networks and data trained on `train.objective=conn`: from a
        window's tokens (no masking) predict the FC of the adjacent 2 x window timepoints;
        deviation loss, no masked-reconstruction term. hcp_conn: 4,000 steps of 16 (samples 3x
        as long as hcp's), 24.7 min on 2 cores nearly alone (43 samples/s), 46-62 min sharing
        them. abide_conn: 5,000 steps of 16, 52-63 min sharing the cores with another
        pretraining run; alone 51-52 samples/s (a 400-step timing run): ~27 min. Commands
        and results: docs/results/objectives.md (eval_conn_r, pooled over the
        held-out windows, init -> end:
        hcp_conn 0.35 -> 0.66-0.70 against 0.65 for the context window's own FC; abide_conn
        0.22 -> 0.35-0.36 against 0.25).

        brainlm-pretrain --config configs/pretrain.py:hcp_conn --workdir runs/hcp_conn_s0
        brainlm-pretrain --config configs/pretrain.py:abide_conn --workdir runs/abide_conn_s0
  13m   4.85M   the released BrainLM checkpoint's shape: hidden 256, 4 layers, 4 heads, MLP 1024;
        decoder 256, 2 layers, 4 heads, MLP 1024; A424 (424 parcels, XYZ embedding), window 200,
        patches of 20 -> 4,240 tokens. (The paper calls this size 13M; at the released config's
        widths our exact-attention network has 4.85M weights.)
  111m  110.8M  ViT-MAE base: encoder 768 x 12 layers x 12 heads, MLP 3072; decoder 512 x 8 x 16,
        MLP 2048 (86M encoder + 25M decoder).
  650m  655.7M  ViT-MAE huge: encoder 1280 x 32 x 16, MLP 5120; decoder 512 x 8 x 16, MLP 2048
        (630M + 25M). Needs FSDP over 8+ accelerators.
  1b    ~1.05B  encoder 1536 x 36 layers x 16 heads, MLP 6144; the 650m decoder. For TPU planning
        (benchmarks/README.md "Cloud TPU plans"):
        JAX_PLATFORMS=cpu brainlm-bench --config configs/pretrain.py:1b --topology v5p-128
Measured costs on 2 CPU cores: tiny 0.25 s/step at batch 8 (Intel Xeon; 0.26 on an AMD EPYC);
13m 20-22 s/step at batch 8 (Intel Xeon; benchmarks/train_step.py, which also runs the PyTorch
peer). One H200 (benchmarks/README.md): 13m at 1.39x the Hugging Face peer's samples/s and
0.81x its memory (bf16, batch 64); 111m at 20% MFU. Compiled for TPU on 2 CPU cores (bf16, batch
256, Pallas attention, benchmarks/README.md "Cloud TPU plans"): 111m fits v5e-16 (14.9 GiB of 16
per chip, 120 s to compile); 650m fits v5p-64 (15.2 GiB of 95, 96 s; batch 1,440 fits too).
"""

import ml_collections

from brainlm_jax.data.datasets import DEFAULT_SUBJECT_PATTERN

# Bundled real data (see ../shared/data/README.md); paths are relative to the repo root.
HCP_DIR = "../shared/data/hcp_rest_aal94"
HCP100_DIR = "../shared/data/hcp100_dk68"
ABIDE_DIR = "../shared/data/abide_cc200"
A424_COORDS = "../shared/data/atlases/A424/A424_Coordinates.dat"

SIZES = {
    #        hidden layers heads mlp   dec_hidden dec_layers dec_heads dec_mlp
    "tiny": (64, 2, 2, 256, 32, 1, 1, 128),
    "abide": (64, 2, 2, 256, 32, 1, 1, 128),
    "hcp": (64, 2, 2, 256, 32, 1, 1, 128),
    "13m": (256, 4, 4, 1024, 256, 2, 4, 1024),
    "111m": (768, 12, 12, 3072, 512, 8, 16, 2048),
    "650m": (1280, 32, 16, 5120, 512, 8, 16, 2048),
    "1b": (1536, 36, 16, 6144, 512, 8, 16, 2048),
}


CONN_PRESETS = ("abide", "hcp")  # <preset>_conn: the connectivity objective on that data


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  name = (arg or "tiny").lower()
  preset, conn = (name[:-len("_conn")], True) if name.endswith("_conn") else (name, False)
  if preset not in SIZES or (conn and preset not in CONN_PRESETS):
    raise ValueError(f"Unknown preset {arg!r}; choose one of "
                     f"{sorted(SIZES) + [p + '_conn' for p in CONN_PRESETS]}")
  small = preset in ("tiny", "abide", "hcp")  # CPU presets
  c = ml_collections.ConfigDict()
  c.preset = name
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # Recordings (dir, glob, file) or a prepared brainlm_fmri TFDS dataset (brainlm-prepare build).
  c.data.path = {"tiny": HCP_DIR, "abide": ABIDE_DIR, "hcp": HCP100_DIR}.get(preset, "")
  c.data.tfds_config = ""  # which builder config, when data.path holds several
  c.data.coords = "" if small else A424_COORDS  # `label x y z` per parcel, or ""
  c.data.num_parcels = 0  # 0: take it from the data
  # Resample every recording to this TR (s; 0: keep each its own). Each recording's TR comes
  # from its cohort folder (a TR table or phenotype column: data/cohort.py).
  c.data.tr = 2.0 if preset == "abide" else 0.0
  c.data.max_dead_fraction = 0.1  # constant parcels kept as missing up to this share
  c.data.window = 30 if preset == "abide" else 200  # timepoints per sample (BrainLM: 200)
  c.data.val_fraction = 0.3  # of subjects (never of windows)
  # Which subjects validate: a hash order seeded by this (-1: by c.seed). Fixed, so that runs of
  # several seeds (init, batches, masks) hold out the same subjects.
  c.data.split_seed = 0
  c.data.subject_pattern = DEFAULT_SUBJECT_PATTERN  # subject id: the BIDS sub-<label>, else the
  # first number of 5+ digits, else the file name up to its first '_' or '.' (docs/data.md)
  c.data.center_recordings = True  # subtract each recording's per-parcel median before scaling
  # Also divide each recording by its own per-parcel IQR: for recordings in different units
  # (scanners, raw BOLD vs % signal change vs z-scores); off = BrainLM's dataset-level scaling.
  c.data.scale_recordings = preset == "abide"  # 16 sites, 16 scanners: per-recording units
  c.data.eval_stride = 0  # 0: non-overlapping validation windows
  # Evaluation windows: this many of every validation recording (seeded by c.seed; 0: all of
  # them), so eval R2 covers every held-out subject and site whatever the window length.
  c.data.eval_windows_per_recording = 4
  c.data.max_eval_windows = 0  # a cap on the total, in file order (0: none)

  hidden, layers, heads, mlp, dhidden, dlayers, dheads, dmlp = SIZES[preset]
  c.model = ml_collections.ConfigDict()
  c.model.num_parcels = -1  # -1: set from the data at run time
  c.model.window = c.data.get_ref("window")
  c.model.patch_len = 10 if preset == "abide" else 20  # timepoints per token (BrainLM: 20)
  c.model.hidden_size = hidden
  c.model.num_layers = layers
  c.model.num_heads = heads
  c.model.mlp_dim = mlp
  c.model.decoder_hidden_size = dhidden
  c.model.decoder_num_layers = dlayers
  c.model.decoder_num_heads = dheads
  c.model.decoder_mlp_dim = dmlp
  c.model.spatial = "auto"  # auto: 'xyz' if data.coords is given, else 'learned'
  # MNI mm x this -> ~[-1, 1]. BrainLM feeds raw mm (1.0; our converter does, for its weights),
  # but from scratch a large identity term drowns the signal: on the tiny preset with xyz
  # coordinates, eval R2 after 1,000 steps 0.25 at 0.01, 0.03 at 0.1 (docs/design.md).
  c.model.coord_scale = 0.01
  c.model.spatial_init_std = 0.02  # init std of a learned parcel table
  c.model.dropout = 0.0  # BrainLM's hidden dropout is 0
  c.model.layer_norm_eps = 1e-6
  # auto: bfloat16 compute on accelerators (TPU, GPU), float32 on CPU; parameters and optimizer
  # state stay float32 (param_dtype). 'float32' / 'bfloat16' force one.
  c.model.dtype = "auto"
  c.model.param_dtype = "float32"
  # auto: cuDNN flash on GPU, Pallas splash on TPU, blockwise on CPU. tiny on
  # CPU: blockwise measured 2.5x faster than XLA's at 941 tokens with 16-32-wide heads.
  c.model.attention = "blockwise" if small else "auto"
  c.model.attention_block_q = 512
  c.model.attention_block_k = 1024
  c.model.scan_layers = preset in ("111m", "650m", "1b")  # compile time flat in depth
  c.model.remat = "none" if small or preset == "13m" else "dots"

  c.masking = ml_collections.ConfigDict()
  # uniform: what BrainLM's forward calls (random_masking: a random subset of all tokens) |
  # parcel: the same count per parcel (BrainLM's unused random_masking_4D) | forecast: last k.
  c.masking.mode = "uniform"
  # BrainLMConfig's default 0.5 for the CPU presets; the released 13M checkpoint was trained at
  # 0.2 (its config.json; train.py's default); ViT-MAE's 0.75 for the ViT-MAE-sized presets.
  c.masking.ratio = {"13m": 0.2, "111m": 0.75, "650m": 0.75, "1b": 0.75}.get(preset, 0.5)
  if conn:  # the connectivity objective reads the whole window (mae_weight > 0 needs masks)
    c.masking.ratio = 0.0
  c.masking.forecast_patches = 2
  # Draw masks in the tf.data pipeline (host; the step receives ids_keep + mask) or, if False,
  # inside the jitted step from fold_in(rng, step). Both are a pure function of (seed, step).
  c.masking.in_pipeline = True

  c.train = ml_collections.ConfigDict()
  # mae: masked reconstruction (BrainLM). conn: from the encoder's tokens of a window, predict
  # the FC of the adjacent target_window timepoints of the same recording (the tokens'
  # parcel x parcel correlation against the target's Pearson FC: models/objectives.py).
  c.train.objective = "conn" if conn else "mae"
  # 'conn': target timepoints (twice the window, following --config.data.window)
  c.train.target_window = c.data.get_ref("window") * 2 if conn else 0
  c.train.mae_weight = 0.0  # 'conn': + this x the masked-reconstruction loss of the window
  # 'conn': deviation (1 - the correlation of the prediction's and the target FC's deviations
  # from the batch's mean: the individual differences only) | mse (against the target's FC).
  c.train.conn_kind = "deviation"
  c.train.batch_size = {"tiny": 8, "abide": 16, "hcp": 16}.get(preset, 256)  # global, data x fsdp
  c.train.num_steps = {"tiny": 1000, "abide": 5000, "hcp": 6000}.get(preset, 100_000)
  if conn and preset == "hcp":  # 600-timepoint samples: the step reads 3x the data
    c.train.num_steps = 4000
  # AdamW; ViT-MAE's base lr 1.5e-4 per 256 samples (linear scaling rule) for the larger presets.
  c.train.learning_rate = 1e-3 if small else 1.5e-4 * c.train.batch_size / 256
  c.train.warmup_steps = {"tiny": 50, "abide": 250, "hcp": 300}.get(preset, 5_000)
  c.train.end_lr_ratio = 0.05  # cosine decays to this fraction of the peak
  c.train.weight_decay = 0.05
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0  # global-norm clipping
  c.train.grad_accum_steps = 1  # >1: micro-batches summed in the step (same batch, less memory)
  c.train.on_nonfinite = "skip"  # NaN/inf loss or grads: 'skip' the update and warn, or 'stop'
  c.train.loss = "mse"  # mse | mae, on masked tokens only
  c.train.log_every = 25 if preset == "tiny" else 100
  c.train.eval_every = {"tiny": 100, "abide": 1000, "hcp": 1000}.get(preset, 2_000)
  c.train.eval_batch_size = 16
  c.train.checkpoint_every = {"tiny": 200, "abide": 1000, "hcp": 1000}.get(preset, 2_000)
  c.train.keep_checkpoints = 3
  c.train.async_checkpoints = True

  # Evaluators run on the current params every `every` steps (transfer/evaluators.py), e.g.
  # c.evals.sid = dict(type="probe", every=500, target="subject-id") in a preset.
  c.evals = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict()
  # -1: all devices left over. Small presets: pure data parallel; large: FSDP (ZeRO-3).
  c.mesh.data = -1 if small or preset == "13m" else 1
  c.mesh.fsdp = 1 if small or preset == "13m" else -1
  c.mesh.tensor = 1
  c.mesh.num_devices = 0  # 0: every device of every host; n: the first n (debugging, benchmarks)
  return c
