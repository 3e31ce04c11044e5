"""The names of the files and folders raytune_ft writes, in one place: an export's and a run directory's.

A leaf: it imports nothing of the package, so whatever reads or writes these files (the export, the model card,
the evaluator, serving, the report, `run`) takes the names from here and not from one another.
"""

# a run directory (OUTPUT_DIR/NAME for `train`, its tune/ for `tune`, a replay's folder)
CONFIG_FILE = "config.yaml"  # the resolved experiment, what --resume and --replay read
RUN_STATE = "run.json"  # `raytune-ft run`: each stage's state and seconds, and the summary

# an export (train's export/, tune's winner/)
METADATA = "raytune_ft.json"  # the experiment, label names, metrics and provenance
CARD = "README.md"  # the model card
EXPERIMENT = "experiment.yaml"  # the experiment as `raytune-ft train` reads it, beside the card
TEST_METRICS = "test_metrics.json"  # the winner's single evaluation on the test split
EVAL_DIR = "eval"  # one folder per `raytune-ft eval` of the export
EVAL_FILE = "eval.json"  # in each: the evaluation report
EVAL_SUMMARY = "eval.md"  # its summary, as the model card shows it
RELIABILITY = "reliability.png"  # its reliability diagram
