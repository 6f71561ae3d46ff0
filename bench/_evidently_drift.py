"""The peer of bench/monitor.py (c): Evidently's embedding drift on the same windows.

Run by bench/monitor.py with a Python where ``pip install evidently`` worked (its own venv: it
pins pandas and pydantic versions headfleet does not need). Per classifier, one Evidently
``Report`` with ``EmbeddingsDriftMetric`` for the model method (a domain classifier's ROC AUC,
threshold 0.55: our ``domain_auc``) and for the MMD method (our ``mmd2``), on the reference and
window embeddings bench/monitor.py saved. Prints one JSON line: classifiers, seconds, drifting.

    python bench/_evidently_drift.py FILE.npz K
"""

import json
import sys
import time

import numpy as np
import pandas as pd
import evidently
from evidently.legacy.metrics import EmbeddingsDriftMetric
from evidently.legacy.metrics.data_drift.embedding_drift_methods import mmd, model
from evidently.legacy.pipeline.column_mapping import ColumnMapping
from evidently.legacy.report import Report


def main() -> None:
    path, k = sys.argv[1], int(sys.argv[2])
    data = np.load(path)
    drifting = 0
    t0 = time.perf_counter()
    for i in range(k):
        ref, cur = data[f"r{i}"], data[f"c{i}"]
        cols = [f"e{j}" for j in range(ref.shape[1])]
        mapping = ColumnMapping(embeddings={"emb": cols})
        report = Report(metrics=[EmbeddingsDriftMetric("emb", drift_method=model()),
                                 EmbeddingsDriftMetric("emb", drift_method=mmd())])
        report.run(reference_data=pd.DataFrame(ref, columns=cols), current_data=pd.DataFrame(cur, columns=cols),
                   column_mapping=mapping)
        results = [m["result"] for m in report.as_dict()["metrics"]]
        drifting += bool(results[0]["drift_detected"])
    print(json.dumps({"classifiers": k, "seconds": time.perf_counter() - t0, "drifting": drifting,
                      "version": evidently.__version__}))


if __name__ == "__main__":
    main()
