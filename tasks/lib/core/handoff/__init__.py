"""The files one stage writes and another reads: one pydantic model each, whose fields are the
file's keys, read and written by the same class (`Model.read(path)`, `model.write(path)`).

| file (base.paths)            | model        | written by | read by                        |
|------------------------------|--------------|------------|--------------------------------|
| <features>/current.json      | Pointer      | extract    | train (the candidates), predict|
| extract_report               | ExtractReport| extract    | train, finetune, evaluate      |
| probe_report                 | ProbeReport  | train      | advise, audit, summary, report |
| compare_report               | CompareReport| train      | tlflow compare, the reports    |
| strategy                     | Strategy     | train      | advise, the run summary        |
| train_choice                 | TrainChoice  | train      | finetune (only what it uses)   |
| eval_metrics                 | EvalMetrics  | evaluate   | the run summary, history       |
| per_class                    | PerClass     | evaluate   | the run summary, the report    |
| predictions                  | Predictions  | evaluate   | the run summary, the report    |
| coverage                     | Coverage     | evaluate   | the report                     |
| finetune_curve               | FinetuneCurve| finetune   | the report                     |
| duplicates                   | Duplicates   | audit      | the run summary, the report    |
| label_issues                 | LabelIssues  | audit      | the run summary, the report    |
| balance                      | Balance      | audit      | the report                     |
| new_images                   | NewImages    | tlflow run | the run summary, the report    |

Files only DVC reads have a writer and no model: the sweep (a plot) and the DVC metrics
extract_metrics, probe_metrics, test_metrics and audit_metrics, which hold a few numbers
each (and the probe's layer name) under short names (`acc` is the chosen probe's val
accuracy in probe_metrics, its test accuracy in test_metrics; `n` the images in the
manifest), so `dvc metrics show` fits 120 columns with fine-tuning on. eval_metrics has
every test score, nested by model as users' scripts read it (`["probe"]["accuracy"]`); it is
git-tracked, not a DVC metric. `dvc metrics diff` compares numbers; the details behind them are
reports/ files and plots.

(The manifest's owner is tasks/lib/data/manifest.py; the model files' sidecars are
tasks/lib/probe/head.py's HeadSidecar and tasks/lib/finetune/network.py's NetworkMeta.)
A missing or malformed file is a TlflowError naming the file and the stage that writes it. A
model ignores keys it does not know (a newer tlflow's file still reads) and requires the ones
it does, unless a default says what an older tlflow's file meant without them.
"""
