"""Everything that reads a pretrained run: one layer every transfer job stands on.

  run.py         opening a run (params, scaler, coordinates, split) and the recordings a job uses;
                 the `Evaluator` base class
  functions.py   the jit-ted model functions (encode, reconstruct, attention), via build_model
  features.py    window features: the encoder's, a random-init encoder's, functional connectivity
  labels.py      task inference, class names, subject folds, scores, intervals
  linear.py      the linear probes (penalty by inner CV)
  tasks.py       fine-tuning tasks: labels and held-out splits
  heads.py       the fine-tuned model: encoder + head, layer-wise lr, the supervised step
  baselines.py   reconstruction / forecast baselines (NumPy)
  report.py      the one report writer (JSON + Markdown table + figures)
  plots.py       every figure
  probe.py, evaluate.py, visualize.py, finetune.py   the jobs (evaluators)
  evaluators.py  the jobs by name, and as hooks of a pretraining run
"""
