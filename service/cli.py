"""``headfleet`` command line: train, classify, manage classifiers, run the demo."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

from headfleet.errors import HeadfleetError, ValidationError
from headfleet.service.cli_backbone import add_parser as add_backbone_parser
from headfleet.service.cli_reproduce import add_parser as add_reproduce_parser
from headfleet.settings import PRECISIONS
from headfleet.service.cli_output import (_print_json, _retrain_line, format_classify, format_experiment,
                                          format_experiments, format_monitor, format_report, format_shadow,
                                          progress_bar)
from headfleet.text import is_blank

DEFAULT_TENANT = "default"


def _settings(args):
    from headfleet.settings import Settings

    return Settings.from_env(data_dir=Path(args.data_dir) if args.data_dir else None, redis_url=args.redis_url,
                             max_length=args.max_length, threads=args.threads)


def cmd_train(args) -> int:
    from headfleet.heads import load_examples
    from headfleet.engine import Engine

    examples = load_examples(args.data, text_col=args.text_col, label_col=args.label_col,
                             multi_label=args.multi_label)
    if args.adapter and args.type != "lora":
        raise SystemExit("train: --adapter imports a PEFT LoRA adapter; use it with --type lora")
    if args.type == "lora":
        return _train_lora(args, examples)
    with Engine.open(_settings(args)) as engine, progress_bar(len(examples.texts), "embedding") as cb:
        manifest = engine.train(args.tenant, args.name, examples, kind=args.type, progress=cb)
    if args.json:
        _print_json(manifest)
        return 0
    print(format_report(manifest["validation"]))
    m = manifest["metrics"]
    print(f"holdout ({m['n_holdout']} examples, trained on {m['n_train']}): accuracy {m['accuracy']:.3f}, "
          f"macro-F1 {m['macro_f1']:.3f}; the saved head is refit on all {m['n_shipped']} examples")
    print(f"saved {args.tenant}/{manifest['id']} (type {manifest['type']}, labels {', '.join(manifest['labels'])})")
    return 0


def _train_lora(args, examples) -> int:
    from headfleet.embedder.lora_train import LoraTrainConfig
    from headfleet.engine import Engine

    config = LoraTrainConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                             use_rslora=args.rslora, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             patience=args.patience, seed=args.seed)
    with Engine.open(_settings(args)) as engine:
        if args.adapter:
            with progress_bar(len(examples.texts), "embedding through the adapter") as cb:
                manifest = engine.train_lora(args.tenant, args.name, examples, adapter_dir=args.adapter, progress=cb,
                                             seed=args.seed)
        else:
            steps = -(-len(examples.texts) * (1 - config.holdout) // config.batch_size) * config.epochs
            from tqdm import tqdm

            with tqdm(total=int(steps), desc="training adapter", unit="step", file=sys.stderr,
                      dynamic_ncols=True) as bar:
                manifest = engine.train_lora(args.tenant, args.name, examples, config=config, seed=args.seed,
                                             progress=bar.update)
    if args.json:
        _print_json(manifest)
        return 0
    if manifest.get("validation"):
        print(format_report(manifest["validation"]))
    m, a = manifest["metrics"], manifest["adapter"]
    if a["source"] == "trained":
        print(f"holdout ({m['holdout_size']} examples): accuracy {m['holdout_accuracy']:.3f} with the adapter, "
              f"{m['frozen_holdout_accuracy']:.3f} with a head on the frozen backbone; best epoch {m['best_epoch']} "
              f"of {m['epochs_run']} run, {m['train_seconds']:.0f} s")
    else:
        print(f"imported adapter (rank {a['rank']}); head holdout accuracy {m['accuracy']:.3f}")
    print(f"saved {args.tenant}/{manifest['id']} (LoRA rank {a['rank']}, alpha {a['alpha']:g}, targets "
          f"{', '.join(a['targets'])}; {a['bytes'] / 1024:.0f} KiB; labels {', '.join(manifest['labels'])})")
    return 0


def _read_texts(args) -> list[str]:
    texts = list(args.texts)
    if texts == ["-"]:
        texts = [line.rstrip("\r\n") for line in sys.stdin if not is_blank(line)]
    if not texts:
        raise SystemExit("classify: give texts as arguments, or '-' to read one per line from stdin")
    return texts


def cmd_classify(args) -> int:
    from headfleet.engine import Engine

    texts = _read_texts(args)
    with Engine.open(_settings(args)) as engine, progress_bar(len(texts), "embedding") as cb:
        t0 = time.perf_counter()
        out = engine.classify(args.tenant, texts, args.classifier, namespace=args.namespace, progress=cb)
        # the same phases as POST /classify: no queue in one process, and the whole call (backbone load excluded)
        out["timing_ms"] = {"queue": 0.0, **out["timing_ms"], "total": round((time.perf_counter() - t0) * 1e3, 3)}
    print(json.dumps(out, indent=2, ensure_ascii=False) if args.json else format_classify(texts, out))
    return 0


def cmd_classifiers(args) -> int:
    from headfleet.heads import Registry

    settings = _settings(args)
    registry = Registry(settings.layout.registry)
    if args.action == "list":
        items = _mark_stale(registry, args.tenant, registry.list(args.tenant), settings)
        if args.json:
            _print_json(items)
        elif not items:
            print(f"tenant {args.tenant!r} has no classifiers")
        for c in items if not args.json else []:
            aliases = ", ".join(f"{a}->{v}" for a, v in c["aliases"].items())
            stale = f"  NEEDS RETRAIN ({', '.join(c['stale_aliases'])}: another backbone)" if c["needs_retrain"] else ""
            a = c.get("adapter")
            lora = f"+ LoRA r{a['rank']} ({', '.join(a['targets'] or [])})  " if a else ""
            print(f"{c['name']:<24} v{c['latest']:<4} {c['type']:<7} {lora}labels: {', '.join(c['labels'])}  "
                  f"aliases: {aliases}{stale}")
    elif args.action == "show":
        _print_json(registry.resolve(args.tenant, args.name))
    elif args.action == "delete":
        registry.delete(args.tenant, args.name)
        print(f"deleted {args.tenant}/{args.name} and all its versions")
    elif args.action == "alias":
        registry.set_alias(args.tenant, args.name, args.alias, args.version)
        print(f"{args.tenant}/{args.name}@{args.alias} -> version {args.version}")
    return 0


def _mark_stale(registry, tenant: str, items: list[dict], settings) -> list[dict]:
    """``needs_retrain`` per classifier against the backbone the settings name (no weights loaded)."""
    from headfleet.embedder.onnx_backend import backbone_fingerprint
    from headfleet.heads.retrain import mark_stale, needs_retrain

    if not items:
        return items
    fp = backbone_fingerprint(settings.model_path, settings.backend, settings.precision)
    return mark_stale(items, needs_retrain(registry, tenant, fp))


def cmd_retrain(args) -> int:
    from headfleet.heads.retrain import stale_versions
    from headfleet.engine import Engine

    settings = _settings(args)
    if args.backend or args.precision:
        settings = dataclasses.replace(settings, backend=args.backend or settings.backend,
                                       precision=args.precision or settings.precision)
    with Engine.open(settings) as engine:
        reg, emb = engine.registry, engine.embedder
        tenants = reg.tenants() if args.all_tenants else [args.tenant]
        results: list[dict] = []
        for tenant in tenants:
            names = args.names or None
            if names and args.all_tenants:  # a fleet-wide retrain by name: the tenants that have it
                names = [n for n in names if n in {c["name"] for c in reg.list(tenant)}] or None
                if names is None:
                    continue
            if args.list:
                results += [{**s.to_dict(), "status": "stale"} for s in stale_versions(reg, tenant, emb.fingerprint, names)]
                continue
            plan = engine.retrain(tenant, names, dry_run=True)
            if not args.dry_run and any(r["status"] == "would_retrain" for r in plan):
                total = sum(r.get("n_examples", 0) for r in plan if r["status"] == "would_retrain")
                with progress_bar(total, f"retraining {tenant}") as cb:
                    plan = engine.retrain(tenant, names, progress=cb)
            results += plan
    if args.json:
        _print_json({"backbone": {"backend": emb.backend, "precision": emb.precision, "fingerprint": emb.fingerprint},
                     "results": results})
    else:
        where = "every tenant" if args.all_tenants else f"tenant {args.tenant!r}"
        print(f"backbone {emb.backend} {emb.precision} ({emb.fingerprint[:12]}), {where}: "
              f"{len(results)} classifier version(s) trained on another backbone")
        for r in results:
            print(_retrain_line(r))
        if not args.list:
            counts = {k: sum(r["status"] == k for r in results)
                      for k in ("retrained", "would_retrain", "no_training_data", "bad_training_data")}
            print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items() if v) or "nothing to retrain")
    blocked = [r for r in results if r["status"] in ("no_training_data", "bad_training_data")]
    return 1 if blocked and not args.list else 0


def cmd_demo(args) -> int:
    from headfleet.engine.examples import ensure_examples, DEMO_TEXTS
    from headfleet.engine import Engine

    with Engine.open(_settings(args)) as engine:
        names = ensure_examples(engine, tenant=args.tenant, log=print)
        for first in (True, False):
            out = engine.classify(args.tenant, DEMO_TEXTS, names)
            misses = out["cache"]["misses"]
            attempt = ("same call again (cached)" if not first else "first call (cold cache)" if misses
                       else "first call (the data folder's cache already holds these texts from an earlier run)")
            print(f"\n== headfleet classify --tenant {args.tenant} " + " ".join(f"-c {n}" for n in names)
                  + f" ...  # {attempt}")
            print(format_classify(DEMO_TEXTS, out))
    return 0


def _save_local_store(engine) -> None:
    """A long job saves the local vector store now and then, so a kill loses few embeddings."""
    if engine.local is not None and engine.local.dirty:
        engine.local.save()


def cmd_score(args) -> int:
    from headfleet.heads import Registry
    from headfleet.scoring import JobSpec, ScoreJob, SourceSpec, format_report
    from headfleet.scoring.progress import ScoreProgress

    settings = _settings(args)
    spec = JobSpec(SourceSpec(args.source, id_col=args.id_col, text_col=args.text_col, table=args.table),
                   Path(args.out), args.tenant, tuple(args.classifier), format=args.format,
                   rejects=Path(args.rejects) if args.rejects else None, namespace=args.namespace,
                   chunk_rows=args.chunk_rows)
    registry = Registry(settings.layout.registry)
    job = ScoreJob(spec, resolve=registry.resolve, batch_size=settings.batch_size, engine=args.engine,
                   restart=args.restart, overwrite=args.overwrite)
    if job.state == "done":
        print(f"{args.out} is already complete (same job, same source); pass --overwrite to score again",
              file=sys.stderr)
    elif job.state == "resume":
        print(f"resuming after {job.counts['documents']:,} documents (run {job.counts['runs']})", file=sys.stderr)
    if job.state != "done" and args.engine == "ray":
        from headfleet.scoring.ray_engine import run_ray

        from headfleet.engine import Engine

        with ScoreProgress(job) as bar:
            run_ray(job, settings, Engine.open, address=args.ray_address, actors=args.ray_actors,
                    on_commit=bar.on_commit)
    elif job.state != "done":
        from headfleet.engine import Engine

        with Engine.open(settings) as engine, ScoreProgress(job) as bar:
            job.run(bar.classify(functools.partial(engine.classify, live=False)), forwards=lambda: engine.embedder.forwards,
                    on_commit=bar.on_commit, persist=lambda: _save_local_store(engine))
    print(json.dumps(job.report, indent=2, ensure_ascii=False) if args.json else format_report(job.report))
    return 0


def cmd_monitor(args) -> int:
    from headfleet.heads import Registry
    from headfleet.lifecycle.monitor import monitored, read_report
    from headfleet.lifecycle.store import open_store

    settings = _settings(args)
    registry, store = Registry(settings.layout.registry), open_store(settings)
    names = [args.name] if args.name else monitored(store, args.tenant)
    reports = [read_report(registry, store, args.tenant, n) for n in names]
    if args.json:
        _print_json(reports[0] if args.name else reports)
    elif not reports:
        print(f"tenant {args.tenant!r} monitors no classifier (PUT /classifiers/NAME/monitor enables it)")
    else:
        print("\n\n".join(format_monitor(r) for r in reports))
    return 0


def cmd_experiments(args) -> int:
    """``headfleet experiments [ID]``: the tenant's experiments, or one with its statistics (store only)."""
    from headfleet.heads import Registry
    from headfleet.lifecycle.experiments import Experiments
    from headfleet.lifecycle.store import open_store

    settings = _settings(args)
    exps = Experiments(None, open_store(settings, "experiments"), registry=Registry(settings.layout.registry))
    out = exps.report(args.tenant, args.id) if args.id else exps.list(args.tenant, limit=args.limit)
    if args.json:
        _print_json(out)
    elif args.id:
        print(format_experiment(out))
    elif not out["experiments"]:
        print(f"tenant {args.tenant!r} has no experiment (POST /experiments starts one)")
    else:
        print(format_experiments(out["experiments"]))
    return 0


def cmd_shadow(args) -> int:
    """``headfleet shadow NAME``: live vs. shadow agreement, flips and feedback accuracy (store only)."""
    from headfleet.heads import Registry
    from headfleet.lifecycle.shadow import Shadows
    from headfleet.lifecycle.store import open_store

    settings = _settings(args)
    shadows = Shadows(None, open_store(settings), registry=Registry(settings.layout.registry))
    report = shadows.report(args.tenant, args.name)
    if args.json:
        _print_json(report)
    else:
        print(format_shadow(report))
    return 0


def cmd_serve(args) -> int:
    from headfleet.service.server import serve
    from headfleet.settings import Settings

    settings = Settings.from_env(
        data_dir=Path(args.data_dir) if args.data_dir else None, redis_url=args.redis_url,
        max_length=args.max_length, threads=args.threads, host=args.host, port=args.port,
        keys_file=Path(args.keys_file) if args.keys_file else None,
        examples=False if args.no_examples else None, workers=args.workers)
    if args.ray or args.replicas is not None or args.autoscale is not None or args.affinity:
        if settings.workers != 1:
            raise ValidationError("--workers (HEADFLEET_WORKERS) runs processes on one machine without Ray; "
                                  "with Ray, use --replicas")
        from headfleet.service.server import serve_ray

        serve_ray(settings, replicas=args.replicas, autoscale=args.autoscale, num_cpus=args.ray_cpus,
                  affinity=args.affinity, log_level=args.log_level, access_log=args.access_log)
        return 0
    serve(settings, log_level=args.log_level, access_log=args.access_log)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headfleet", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", help="data folder (registry, local vector store); env HEADFLEET_DATA_DIR")
    common.add_argument("--redis-url", help="Redis shared cache tier, e.g. redis://127.0.0.1:6379/0")
    common.add_argument("--max-length", type=int, help="max tokens per text (longer texts are truncated, and said so)")
    common.add_argument("--threads", type=int, help="CPU threads for the backbone")
    common.add_argument("--tenant", default=DEFAULT_TENANT, help=f"tenant (default {DEFAULT_TENANT!r})")
    common.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", parents=[common], help="train a classifier version from labelled examples")
    t.add_argument("--name", required=True)
    t.add_argument("--data", required=True, help="CSV or JSONL file of labelled examples")
    t.add_argument("--text-col", default="text")
    t.add_argument("--label-col", default="label")
    t.add_argument("--type", default="logreg", choices=["logreg", "mlp", "lora"],
                   help="a head on the frozen backbone (logreg, mlp), or a LoRA adapter plus a head (lora)")
    t.add_argument("--multi-label", action="store_true", help="labels are lists (JSONL) or 'a|b' (CSV)")
    lo = t.add_argument_group("LoRA (--type lora)")
    lo.add_argument("--adapter", help="import this PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) "
                    "trained on the same base model, and fit the head on its embeddings")
    lo.add_argument("--rank", type=int, default=8)
    lo.add_argument("--alpha", type=float, default=None, help="default: 2 x rank")
    lo.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank)")
    lo.add_argument("--epochs", type=int, default=5)
    lo.add_argument("--batch-size", type=int, default=16)
    lo.add_argument("--lr", type=float, default=5e-4)
    lo.add_argument("--patience", type=int, default=2, help="epochs without holdout improvement before stopping")
    lo.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("classify", parents=[common], help="classify texts with one or more classifiers")
    c.add_argument("-c", "--classifier", action="append", required=True, help="name, name@version or name@alias")
    c.add_argument("--namespace", help="a shared cache namespace instead of the tenant's own")
    c.add_argument("texts", nargs="+", help="texts, or '-' to read one per line from stdin")
    c.set_defaults(func=cmd_classify)

    m = sub.add_parser("classifiers", help="list, show, delete classifiers; move an alias")
    actions = m.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common], help="the tenant's classifiers")
    actions.add_parser("show", parents=[common], help="a version's manifest").add_argument(
        "name", help="name, name@version or name@alias")
    actions.add_parser("delete", parents=[common], help="delete a classifier and all its versions").add_argument("name")
    a = actions.add_parser("alias", parents=[common], help="point an alias (e.g. prod) at a version")
    a.add_argument("name")
    a.add_argument("alias")
    a.add_argument("version", type=int)
    m.set_defaults(func=cmd_classifiers)

    r = sub.add_parser("retrain", parents=[common],
                       help="retrain classifiers trained on another backbone (after a backend/precision switch) "
                            "from their stored training data")
    r.add_argument("names", nargs="*", help="classifier names (default: every stale classifier of the tenant)")
    r.add_argument("--all-tenants", action="store_true", help="every tenant in the registry")
    r.add_argument("--list", action="store_true", help="only list what must be retrained")
    r.add_argument("--dry-run", action="store_true", help="read and check the stored data, say what would be retrained")
    r.add_argument("--backend", choices=["torch", "onnx"], help="the backbone backend (env HEADFLEET_BACKEND)")
    r.add_argument("--precision", choices=PRECISIONS, help="its precision (env HEADFLEET_PRECISION)")
    r.set_defaults(func=cmd_retrain)

    d = sub.add_parser("demo", parents=[common], help="train the example classifiers and classify sample texts")
    d.set_defaults(func=cmd_demo)

    sc = sub.add_parser("score", parents=[common], help="score a document store (JSONL, CSV, Parquet, SQLite) "
                        "with classifiers; resumable: run the same command again after an interruption")
    sc.add_argument("--source", required=True, help="a .jsonl/.csv/.parquet file, a folder of them, or an SQLite database")
    sc.add_argument("-c", "--classifier", action="append", required=True, help="name, name@version or name@alias")
    sc.add_argument("--out", required=True, help="output file, .parquet or .jsonl (rejects and report go beside it)")
    sc.add_argument("--id-col", default="id", help="the document id column (default: id)")
    sc.add_argument("--text-col", default="text", help="the text column (default: text)")
    sc.add_argument("--table", help="the SQLite table (default: the database's only table)")
    sc.add_argument("--format", choices=["parquet", "jsonl"], help="output format (default: from --out's suffix)")
    sc.add_argument("--rejects", help="where bad rows go (default: <out stem>.rejects.jsonl)")
    sc.add_argument("--namespace", help="a shared cache namespace instead of the tenant's own")
    sc.add_argument("--chunk-rows", type=int, default=1024, help="rows per committed chunk (default: 1024)")
    sc.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local: this process; ray: Ray Data with an actor pool (set --redis-url to share the cache)")
    sc.add_argument("--ray-address", help="an existing Ray cluster (default: RAY_ADDRESS, else a local instance)")
    sc.add_argument("--ray-actors", type=int, help="scoring actors in the pool (default: the cluster's CPUs less one)")
    sc.add_argument("--restart", action="store_true", help="discard a partial output of a different job and start over")
    sc.add_argument("--overwrite", action="store_true", help="replace a finished output")
    sc.set_defaults(func=cmd_score)

    mo = sub.add_parser("monitor", parents=[common], help="monitor windows, alerts and retrains of classifiers")
    mo.add_argument("name", nargs="?", help="one classifier (default: every monitored one of the tenant)")
    mo.set_defaults(func=cmd_monitor)

    ex = sub.add_parser("experiments", parents=[common], help="A/B experiments: list them, or show one's statistics")
    ex.add_argument("id", nargs="?", help="one experiment (exp-...): arms, lift, Welch, SRM, guardrails, recommendation")
    ex.add_argument("--limit", type=int, default=50, help="experiments listed, newest first (default: 50)")
    ex.set_defaults(func=cmd_experiments)

    sh = sub.add_parser("shadow", parents=[common], help="a classifier's shadow: agreement, flips, feedback accuracy")
    sh.add_argument("name", help="the classifier")
    sh.set_defaults(func=cmd_shadow)

    s = sub.add_parser("serve", parents=[common], help="run the HTTP service")
    s.add_argument("--host", help="bind address (env HEADFLEET_HOST, default 127.0.0.1; loopback only without keys)")
    s.add_argument("--port", type=int, help="port (env HEADFLEET_PORT, default 8080)")
    s.add_argument("--keys-file", help="API keys file (env HEADFLEET_KEYS_FILE, default <data-dir>/keys.json)")
    s.add_argument("--no-examples", action="store_true",
                   help="do not train the example classifiers at first start (single-tenant mode)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--access-log", action="store_true", help="log every request")
    s.add_argument("--workers", type=int,
                   help="worker processes on one port, each a whole service on the same data folder (env "
                        "HEADFLEET_WORKERS, default 1); /stats, /metrics and a backbone reload span them all")
    s.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve (pip install 'headfleet[ray]'): the same app in N replicas behind Ray's "
                        "proxy; joins RAY_ADDRESS when set, else starts a local Ray")
    s.add_argument("--replicas", type=int, help="with --ray: this many replicas (default 1)")
    s.add_argument("--autoscale", metavar="MIN:MAX", help="with --ray: autoscale between MIN and MAX replicas")
    s.add_argument("--ray-cpus", type=float, help="with --ray: CPUs reserved per replica (default 1)")
    s.add_argument("--affinity", action="store_true",
                   help="with --ray: a router sends a one-text request to the replica that saw the text (memory-tier "
                        "hits) and retries idempotent requests whose replica died")
    s.set_defaults(func=cmd_serve)
    add_reproduce_parser(sub, common)
    add_backbone_parser(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HeadfleetError as exc:
        print(f"error ({exc.error_type}): {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `headfleet ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
