"""``headfleet`` command line: train, classify, manage classifiers, run the demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from headfleet.errors import HeadfleetError

PROGRESS_THRESHOLD = 300  # texts; below this a progress bar is noise
DEFAULT_TENANT = "default"


def _settings(args):
    from headfleet.settings import Settings

    return Settings.from_env(data_dir=Path(args.data_dir) if args.data_dir else None, redis_url=args.redis_url,
                             max_length=args.max_length, threads=args.threads)


@contextlib.contextmanager
def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr for long work, or a no-op callback for short work."""
    if total <= PROGRESS_THRESHOLD:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="text", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_report(report: dict) -> str:
    lines = [f"examples: {report['n_examples']}   per class: "
             + ", ".join(f"{k}={v}" for k, v in report["per_class"].items()),
             f"duplicates: {report['duplicates']}   conflicting labels: {report['conflicting']}   "
             f"[UNK] share: {report.get('unk_share') or 0:.2%}   truncated: {report.get('truncated_share') or 0:.2%}"]
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def format_classify(texts: list[str], out: dict) -> str:
    refs = list(out["results"][0]["classifications"]) if out["results"] else []
    header = ["text"] + refs + ["cache"]
    rows = []
    for text, r in zip(texts, out["results"]):
        cells = [_clip(text, 40) + (" [truncated]" if r["truncated"] else "")]
        for ref in refs:
            c = r["classifications"][ref]
            if "label" in c:
                cells.append(f"{c['label']} {c['scores'][c['label']]:.2f}")
            else:
                cells.append(",".join(c["labels"]) or "-")
        cells.append(r["cache"])
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    cache = out["cache"]
    hits = ", ".join(f"{k} {v}" for k, v in cache["hits"].items())
    lines = [fmt(header)] + [fmt(r) for r in rows]
    lines.append(f"cache: hits {hits}; misses {cache['misses']}; embeddings computed {cache['computed']}"
                 f"   time ms: " + ", ".join(f"{k} {v:.1f}" for k, v in out["timing_ms"].items()))
    return "\n".join(lines)


def cmd_train(args) -> int:
    from headfleet.heads import load_examples
    from headfleet.service.engine import Engine

    examples = load_examples(args.data, text_col=args.text_col, label_col=args.label_col,
                             multi_label=args.multi_label)
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


def _read_texts(args) -> list[str]:
    texts = list(args.texts)
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise SystemExit("classify: give texts as arguments, or '-' to read one per line from stdin")
    return texts


def cmd_classify(args) -> int:
    from headfleet.service.engine import Engine

    texts = _read_texts(args)
    with Engine.open(_settings(args)) as engine, progress_bar(len(texts), "embedding") as cb:
        out = engine.classify(args.tenant, texts, args.classifier, namespace=args.namespace, progress=cb)
    print(json.dumps(out, indent=2, ensure_ascii=False) if args.json else format_classify(texts, out))
    return 0


def cmd_classifiers(args) -> int:
    from headfleet.heads import Registry

    registry = Registry(Path(_settings(args).data_dir) / "registry")
    if args.action == "list":
        items = registry.list(args.tenant)
        if args.json:
            _print_json(items)
        elif not items:
            print(f"tenant {args.tenant!r} has no classifiers")
        for c in items if not args.json else []:
            aliases = ", ".join(f"{a}->{v}" for a, v in c["aliases"].items())
            print(f"{c['name']:<24} v{c['latest']:<4} {c['type']:<7} labels: {', '.join(c['labels'])}  aliases: {aliases}")
    elif args.action == "show":
        _print_json(registry.resolve(args.tenant, args.name))
    elif args.action == "delete":
        registry.delete(args.tenant, args.name)
        print(f"deleted {args.tenant}/{args.name} and all its versions")
    elif args.action == "alias":
        registry.set_alias(args.tenant, args.name, args.alias, args.version)
        print(f"{args.tenant}/{args.name}@{args.alias} -> version {args.version}")
    return 0


def cmd_demo(args) -> int:
    from headfleet.service.examples import ensure_examples, DEMO_TEXTS
    from headfleet.service.engine import Engine

    with Engine.open(_settings(args)) as engine:
        names = ensure_examples(engine, tenant=args.tenant, log=print)
        for attempt in ("first call (cold cache)", "same call again (cached)"):
            print(f"\n== headfleet classify --tenant {args.tenant} " + " ".join(f"-c {n}" for n in names)
                  + f" ...  # {attempt}")
            print(format_classify(DEMO_TEXTS, engine.classify(args.tenant, DEMO_TEXTS, names)))
    return 0


def cmd_serve(args) -> int:
    from headfleet.service.server import serve
    from headfleet.settings import Settings

    settings = Settings.from_env(
        data_dir=Path(args.data_dir) if args.data_dir else None, redis_url=args.redis_url,
        max_length=args.max_length, threads=args.threads, host=args.host, port=args.port,
        keys_file=Path(args.keys_file) if args.keys_file else None,
        examples=False if args.no_examples else None)
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
    t.add_argument("--type", default="logreg", choices=["logreg", "mlp"])
    t.add_argument("--multi-label", action="store_true", help="labels are lists (JSONL) or 'a|b' (CSV)")
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

    d = sub.add_parser("demo", parents=[common], help="train the example classifiers and classify sample texts")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", parents=[common], help="run the HTTP service")
    s.add_argument("--host", help="bind address (env HEADFLEET_HOST, default 127.0.0.1; loopback only without keys)")
    s.add_argument("--port", type=int, help="port (env HEADFLEET_PORT, default 8080)")
    s.add_argument("--keys-file", help="API keys file (env HEADFLEET_KEYS_FILE, default <data-dir>/keys.json)")
    s.add_argument("--no-examples", action="store_true",
                   help="do not train the example classifiers at first start (single-tenant mode)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--access-log", action="store_true", help="log every request")
    s.set_defaults(func=cmd_serve)
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
