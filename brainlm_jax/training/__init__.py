"""The training core: state, steps, the loop, sharding, checkpoints, metrics.

  state.py       TrainState, optimizer (clip, AdamW, warmup-cosine), config checks, init
  steps.py       the pure train / eval steps, their one update tail, and their jit-ted forms
  loop.py        the one training loop (batches, eval callback, checkpoints, preemption,
                 non-finite watch, metric writer), shared by pretraining and fine-tuning
  pretrain.py    the pretraining job (`train_and_evaluate`)
  sharding.py    the mesh and the logical-axis rules
  checkpoint.py  Orbax checkpoints, the fallback policy, params-only restore
  metrics.py     masked-reconstruction statistics, writers, progress lines
  storage.py     the path library of workdirs and checkpoints: local or gs:// (etils.epath)
"""
