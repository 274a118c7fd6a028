"""The ``tbps`` command line: parses arguments and calls the library. No logic lives here.

Every command turns bad input into one line, ``tbps: error: ...``, and exit status 1
(2 for a malformed command line); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tbps import __version__
from tbps.errors import TBPSError

DATASET_HELP = "dataset name: cuhk-pedes, icfg-pedes, rstpreid, synth (or one you registered)"
ROOT_HELP = "the dataset's own folder, the one holding the annotation file and imgs/"

EXAMPLES = """examples:
  tbps demo --quick                                   the whole pipeline on synthetic data (CPU)
  tbps synth --out data/synth --ids 500               write a SynthPEDES dataset
  tbps data stats --dataset cuhk-pedes --root /data/CUHK-PEDES
  tbps train --config configs/irra_cuhk.yaml data.root=/data/CUHK-PEDES
  tbps eval --checkpoint runs/irra_cuhk/best.pt --json
"""


IMAGE_ROOT_HELP = ("the gallery's folder now, when it has moved since tbps index (the index stores "
                   "paths relative to the folder it indexed; default: that folder)")


# ----------------------------------------------------------------------------- handlers

def _cmd_synth(args: argparse.Namespace) -> int:
    from tbps.data.synth import generate_synthpedes

    if args.scenes:
        from tbps.footage.scenes import generate_scenes

        made = generate_scenes(args.out, num_ids=args.ids, cameras=args.cameras, frames_per_camera=args.frames,
                               people_per_frame=args.people_per_frame, height=args.scene_height,
                               width=args.scene_width, fps=args.fps, seed=args.seed, videos=not args.no_videos,
                               val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                               progress=not args.quiet)
        print(f"wrote {made['frames']} frames of {made['cameras']} cameras ({made['boxes']} person boxes, "
              f"{made['identities']} identities) to {args.out}")
        return 0
    summary = generate_synthpedes(
        args.out,
        num_ids=args.ids,
        images_per_id=args.images_per_id,
        captions_per_image=args.captions_per_image,
        height=args.height,
        width=args.width,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        progress=not args.quiet,
    )
    print(f"wrote {summary['images']} images and {summary['captions']} captions of "
          f"{summary['ids']} identities to {args.out}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from tbps.data.datasets import load_dataset

    stats = load_dataset(args.dataset, args.root).statistics()
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"{'split':<6} {'ids':>8} {'images':>8} {'captions':>9}")
    for split, row in stats.items():
        print(f"{split:<6} {row['ids']:>8,} {row['images']:>8,} {row['captions']:>9,}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from tbps.data.datasets import check_images, load_dataset

    dataset = load_dataset(args.dataset, args.root)
    report = check_images(dataset, decode=not args.exists_only, progress=not args.quiet)
    print(report.summary(limit=args.show))
    return 0 if report.ok else 1


def _cmd_import(args: argparse.Namespace) -> int:
    from tbps.importers import import_checkpoint

    summary = import_checkpoint(args.source, args.file, args.out, config=args.config, vocab=args.vocab,
                                arch=args.arch, image_size=tuple(args.image_size) if args.image_size else None)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "dropped"} | {"dropped": len(summary["dropped"])}))
        return 0
    height, width = summary["image_size"]
    print(f"wrote {summary['out']}: method {summary['method']}, {summary['arch']} at {height}x{width}, "
          f"text length {summary['text_length']}, {summary['num_classes']} identities, "
          f"{summary['parameters']:,} parameters")
    if summary["dropped"]:
        print(f"dropped {len(summary['dropped'])} weights of heads tbps's {summary['method']} has no place for")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tbps.config import load_config
    from tbps.engine.trainer import train

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    if args.resume and args.overwrite:
        raise TBPSError("--resume continues the run in the output folder and --overwrite deletes it: give one")
    train(cfg, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from tbps.config import PACKAGED_CONFIGS, list_recipes

    recipes = list_recipes()
    width = max(len(name) for name, _ in recipes)
    for name, summary in recipes:
        print(f"{name:<{width}}  {summary}")
    print(f"\n{len(recipes)} recipes in {PACKAGED_CONFIGS}; use one with tbps train --config NAME")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tbps.engine.evaluator import evaluate_checkpoint, format_metrics_table

    metrics = evaluate_checkpoint(
        args.checkpoint,
        dataset=args.dataset,
        root=args.root,
        split=args.split,
        device=args.device,
        batch_size=args.batch_size,
        i2t=args.i2t,
        progress=not args.json,
        overrides=args.overrides,
    )
    if args.json:
        print(json.dumps({k: metrics[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}), flush=True)
    else:
        print(format_metrics_table(metrics), flush=True)
    if args.log:  # after printing: a failed write must not lose the result
        import datetime

        from tbps.engine.evaluator import append_metrics_jsonl

        row = {"event": "eval", "split": args.split, "dataset": args.dataset, "root": args.root,
               "checkpoint": args.checkpoint, "overrides": list(args.overrides), **metrics,
               "time": datetime.datetime.now().isoformat(timespec="seconds")}
        try:
            append_metrics_jsonl(args.log, row)
        except OSError as exc:
            from tbps.io import write_error

            raise write_error(args.log, exc) from None
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from tbps.serve import serve

    serve(args.index, host=args.host, port=args.port, checkpoint=args.checkpoint, device=args.device,
          max_query_chars=args.max_query_chars, max_k=args.max_k, max_batch=args.max_batch,
          log_level=args.log_level, image_root=args.image_root, allowed_hosts=args.allowed_host,
          token=args.token, audit_log=args.audit_log, header_timeout=args.header_timeout)
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from tbps.visualize import visualize

    ranked = visualize(args.out, checkpoint=args.checkpoint, index=args.index, dataset=args.dataset,
                       root=args.root, split=args.split, queries=args.queries, num_queries=args.num_queries,
                       top_k=args.top_k, seed=args.seed, rerank=args.rerank == "on", device=args.device,
                       image_root=args.image_root)
    known = [q.first_match_rank for q in ranked if q.first_match_rank is not None]
    note = f"; first true match at rank {', '.join(map(str, known))}" if known else ""
    print(f"wrote {args.out}: {len(ranked)} queries x top {args.top_k}{note}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from tbps.search.index import build_index

    if args.footage:
        from tbps.footage.detect import build_detector
        from tbps.footage.ingest import build_footage_index

        detector = build_detector(args.detector, args.detector_weights, args.min_score,
                                  device="cpu" if args.device == "auto" else args.device)
        summary = build_footage_index(args.checkpoint, args.footage, args.out, detector, sample_fps=args.sample_fps,
                                      manifest=args.manifest, frame_rate=args.frame_rate, progress=not args.quiet,
                                      batch_size=args.batch_size, device=args.device, num_workers=args.workers,
                                      backend=args.backend)
        bad = (f"; skipped {summary['unreadable_sources']} unreadable source(s) and "
               f"{summary['unreadable_frames']} unreadable frame(s)") if summary["unreadable_sources"] or \
            summary["unreadable_frames"] else ""
        print(f"read {summary['sources'] - summary['already_ingested']} new source(s) "
              f"({summary['already_ingested']} already there), {summary['frames']} sampled frames, "
              f"{summary['new_crops']} person crops{bad}; {args.out} holds {summary['total']} crops")
        return 0
    summary = build_index(args.checkpoint, args.images, args.out, batch_size=args.batch_size, device=args.device,
                          num_workers=args.workers, progress=not args.quiet, backend=args.backend)
    note = f", skipped {summary['skipped']} unreadable" if summary["skipped"] else ""
    print(f"indexed {summary['added']} new images ({summary['already_indexed']} already there{note}); "
          f"{args.out} holds {summary['total']} images, first stage: {summary['backend']}")
    return 0


def _read_queries(args: argparse.Namespace) -> list[str]:
    from pathlib import Path

    queries = list(args.query)
    if args.queries:
        path = Path(args.queries)
        if not path.is_file():
            raise TBPSError(f"{path}: query file not found")
        queries += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not queries:
        raise TBPSError("no query: give a description in quotes or --queries FILE")
    return queries


def _cmd_search(args: argparse.Namespace) -> int:
    from tbps.search.searcher import Searcher

    queries = _read_queries(args)
    searcher = Searcher(args.index, checkpoint=args.checkpoint, device=args.device, backend=args.backend,
                        image_root=args.image_root)
    results = searcher.search(queries, top_k=args.top_k, rerank=args.rerank == "on", shortlist=args.shortlist,
                              cameras=args.camera, time_from=args.time_from, time_to=args.time_to,
                              group_tracks=args.group_tracks)
    footage = ("camera", "time", "box")
    if args.json:
        rows = [[{k: r[k] for k in ("rank", "path", "score", *footage) if k in r} for r in ranked]
                for ranked in results]
        print(json.dumps(rows[0] if len(rows) == 1 else rows))
        return 0
    for query, ranked in zip(queries, results):
        print(f'query: "{query}"')
        for r in ranked:
            when = r.get("time_iso", f"t={r.get('time', 0.0):.2f}s")
            where = f"  camera {r['camera']} {when} box {r['box']}" if "camera" in r else ""
            print(f"  {r['rank']:>3}. {r['score']:+.4f}  {r['path']}{where}")
    return 0


def _cmd_train_detector(args: argparse.Namespace) -> int:
    from tbps.footage.hog_train import train_hog_detector

    made = train_hog_detector(args.scenes, args.out)
    print(f"trained on {made['frames']} frames ({made['positives']} person windows, {made['negatives']} + "
          f"{made['hard_negatives']} hard negatives); use it with tbps index --detector hog:{args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tbps.demo import run_demo

    if args.scenes:
        from tbps.footage.demo import run_footage_demo

        run_footage_demo(out=args.out, device=args.device, checkpoint=args.checkpoint)
        return 0
    run_demo(out=args.out, quick=args.quick, device=args.device)
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbps",
        description="Text-based person search: rank pedestrian images by a text description.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tbps {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    # synth
    p = sub.add_parser("synth", formatter_class=fmt, help="write a SynthPEDES synthetic dataset",
                       description="Write a synthetic pedestrian dataset (SynthPEDES) in the CUHK-PEDES "
                       "layout: DIR/imgs/... and DIR/reid_raw.json. Deterministic for a seed.")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--ids", type=int, default=1000, help="number of identities, all splits together")
    p.add_argument("--images-per-id", type=int, default=4, help="images of each identity")
    p.add_argument("--captions-per-image", type=int, default=2, help="captions of each image")
    p.add_argument("--height", type=int, default=384, help="image height in pixels")
    p.add_argument("--width", type=int, default=128, help="image width in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same dataset")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of identities in the val split")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of identities in the test split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--scenes", action="store_true",
                   help="write camera footage instead: frames/<camera>/*.jpg, videos/<camera>.mp4 and "
                        "annotations.json (boxes, identities, tracks, captions) of the test identities of the "
                        "SynthPEDES set with the same --ids and --seed")
    p.add_argument("--cameras", type=int, default=3, help="with --scenes: number of cameras")
    p.add_argument("--frames", type=int, default=24, help="with --scenes: frames per camera")
    p.add_argument("--people-per-frame", type=int, default=3, help="with --scenes: people in view at once")
    p.add_argument("--fps", type=int, default=4, help="with --scenes: frame rate of the footage")
    p.add_argument("--scene-width", type=int, default=640, help="with --scenes: frame width in pixels")
    p.add_argument("--scene-height", type=int, default=360, help="with --scenes: frame height in pixels")
    p.add_argument("--no-videos", action="store_true", help="with --scenes: frames only, no MP4 files")
    p.set_defaults(func=_cmd_synth)

    # data
    p = sub.add_parser("data", help="inspect and check a dataset",
                       description="Parse a dataset and report its statistics or check its images.")
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True
    q = data_sub.add_parser("stats", formatter_class=fmt, help="identities, images and captions per split",
                            description="Parse a dataset and print, per split, identities, images and captions.")
    q.add_argument("--dataset", required=True, help=DATASET_HELP)
    q.add_argument("--root", required=True, help=ROOT_HELP)
    q.add_argument("--json", action="store_true",
                   help='print {"train": {"ids", "images", "captions"}, "val": ..., "test": ...}')
    q.set_defaults(func=_cmd_data_stats)
    q = data_sub.add_parser("check", formatter_class=fmt, help="verify every referenced image exists and decodes",
                            description="Verify that every image the annotations reference exists and decodes. "
                            "Prints a count and the first missing or corrupt paths; exits 1 if any.")
    q.add_argument("--dataset", required=True, help=DATASET_HELP)
    q.add_argument("--root", required=True, help=ROOT_HELP)
    q.add_argument("--exists-only", action="store_true", help="only check that files exist (fast)")
    q.add_argument("--show", type=int, default=10, help="how many bad paths to list")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_data_check)

    # train
    p = sub.add_parser("train", formatter_class=fmt, help="train a method from a YAML recipe",
                       description="Train a method. Writes OUTPUT_DIR/config.yaml, last.pt (every epoch), "
                       "best.pt (best val R1), metrics.jsonl. Extra key=value arguments override the "
                       "recipe, e.g. optim.lr=1e-4 data.root=/data/CUHK-PEDES. Multi-GPU: "
                       "torchrun --nproc_per_node=N -m tbps train ...")
    p.add_argument("--config", required=True,
                   help="recipe: a packaged one by name (irra_cuhk; tbps configs lists them) or a YAML file, "
                        "e.g. configs/irra_cuhk.yaml")
    p.add_argument("--output-dir", default=None, help="where outputs go (default: train.output_dir)")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUTPUT_DIR/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an OUTPUT_DIR that holds another run, deleting its checkpoints and log "
                        "(without it such a folder is refused)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimiser steps, then evaluate and save (smoke runs)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("configs", help="list the recipes that ship inside the package",
                       description="List the packaged training recipes (name and what each is). Name one with "
                       "tbps train --config NAME from any folder; copy one to change it.")
    p.set_defaults(func=_cmd_configs)

    # eval
    p = sub.add_parser("eval", formatter_class=fmt, help="text-to-image evaluation of a checkpoint",
                       description="Evaluate a checkpoint with the field's protocol: R1/R5/R10, mAP, mINP "
                       "(percent). The dataset defaults to the one the checkpoint was trained on.")
    p.add_argument("--checkpoint", required=True, help="a tbps checkpoint (best.pt or last.pt)")
    p.add_argument("--dataset", default=None, help=DATASET_HELP + " (default: the checkpoint's)")
    p.add_argument("--root", default=None, help=ROOT_HELP + " (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="which split to evaluate")
    p.add_argument("--batch-size", type=int, default=128, help="images or captions per embedding batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--i2t", action="store_true", help="also report image-to-text retrieval")
    p.add_argument("--json", action="store_true", help='print {"R1", "R5", "R10", "mAP", "mINP"} only')
    p.add_argument("--log", default=None, metavar="FILE",
                   help="also append the result as a JSON line to FILE (nothing is written without it)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="inference-time config changes applied to the checkpoint's saved config, "
                        "e.g. method.fuse_weight=1.0 (the method's docs list its options)")
    p.set_defaults(func=_cmd_eval)

    # index / search / serve
    search_fmt = type("SearchHelpFormatter", (argparse.RawDescriptionHelpFormatter, fmt), {})
    p = sub.add_parser("index", formatter_class=search_fmt, help="embed a gallery of images into a persistent index",
                       description="Embed every image of a folder or list into a persistent gallery index:\n"
                       "memory-mapped embeddings, image paths, the model's fingerprint and config.\n"
                       "Resumable: a killed run continues after its last complete shard. Run again with\n"
                       "more images to append (images already indexed are not embedded again).\n"
                       "Unreadable files are skipped with a warning and counted.",
                       epilog="example:\n  tbps index --checkpoint runs/demo/train/best.pt "
                       "--images runs/demo/data/imgs --out runs/demo/index")
    p.add_argument("--checkpoint", required=True, help="a tbps checkpoint (best.pt or last.pt)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images",
                        help="a folder of images (searched recursively) or a text file listing image paths, one "
                             "per line (relative paths are relative to the list's folder)")
    source.add_argument("--footage",
                        help="camera footage instead of person crops: a video file, or a folder of videos and "
                             "frame folders; camera ids from the first folder level or a footage.json manifest "
                             "(docs: README, 'Search camera footage')")
    p.add_argument("--out", required=True,
                   help="index folder (created; appended to if it holds an index of the same model)")
    p.add_argument("--batch-size", type=int, default=64, help="images per embedding batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: up to 4)")
    p.add_argument("--backend", default="auto", choices=["auto", "exact", "faiss-hnsw", "faiss-ivf"],
                   help="first-stage search saved with the index: exact matrix product, or a FAISS HNSW or "
                        "IVF index; auto = exact below 100,000 images, HNSW above")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from tbps.footage.detect import DETECTOR_HELP

    p.add_argument("--detector", default="hog", help="with --footage: the person detector: " + DETECTOR_HELP)
    p.add_argument("--detector-weights", default=None, help="with --footage: a torchvision detector's weight file")
    p.add_argument("--min-score", type=float, default=None,
                   help="with --footage: lowest detection score kept (unset: 0.5 for torchvision models, 0.0 for hog)")
    p.add_argument("--sample-fps", type=float, default=None,
                   help="with --footage: frames per second kept from videos and frame folders (unset: every frame)")
    p.add_argument("--frame-rate", type=float, default=1.0,
                   help="with --footage: frame rate of frame folders that the manifest gives none for")
    p.add_argument("--manifest", default=None,
                   help="with --footage: a footage.json naming every source's camera and start time "
                        "(unset: FOOTAGE/footage.json when present)")
    p.set_defaults(func=_cmd_index)
    p = sub.add_parser("search", formatter_class=search_fmt, help="search an index by a text description",
                       description="Rank the images of an index for text descriptions. The global embedding\n"
                       "shortlists candidates; a method with a fine-grained similarity re-ranks them.",
                       epilog="examples:\n  tbps search --index runs/demo/index \"a woman in a red coat\"\n"
                       "  tbps search --index runs/demo/index --queries queries.txt --json")
    p.add_argument("--index", required=True, help="index folder written by tbps index")
    p.add_argument("--top-k", type=int, default=10, help="how many results per query")
    p.add_argument("--json", action="store_true",
                   help='print a list of {"rank", "path", "score"} (a list of such lists for several queries)')
    p.add_argument("--rerank", default="on", choices=["on", "off"],
                   help="re-rank the shortlist with the method's fine-grained similarity (where it has one)")
    p.add_argument("--shortlist", type=int, default=100, help="first-stage candidates that are re-ranked")
    p.add_argument("--queries", default=None, help="a text file of queries, one per line (batch search)")
    p.add_argument("--checkpoint", default=None, help="the model (default: the checkpoint the index records)")
    p.add_argument("--backend", default=None, choices=["auto", "exact", "faiss-hnsw", "faiss-ivf"],
                   help="first-stage search (default: the one saved with the index)")
    p.add_argument("--image-root", default=None, help=IMAGE_ROOT_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--camera", action="append", default=None,
                   help="footage indexes: only crops of this camera (repeat for several)")
    p.add_argument("--time-from", default=None,
                   help="footage indexes: only crops at or after this time (seconds, or ISO 8601 such as "
                        "2026-01-05T08:00:00)")
    p.add_argument("--time-to", default=None, help="footage indexes: only crops at or before this time")
    p.add_argument("--group-tracks", action="store_true",
                   help="footage indexes: one result per track (the same person in consecutive frames)")
    p.add_argument("query", nargs="*", help="descriptions, e.g. 'a man in a grey hoodie with a red backpack'")
    p.set_defaults(func=_cmd_search)
    p = sub.add_parser("serve", formatter_class=fmt, help="HTTP API and web page to search an index",
                       description="Serve the search page and the HTTP API for an index. It listens on "
                       "127.0.0.1 only by default; before exposing it, set a token and put it behind a "
                       "TLS reverse proxy (README, 'Serving').")
    p.add_argument("--index", required=True, help="index folder written by tbps index")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--checkpoint", default=None, help="the model (default: the checkpoint the index records)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--max-query-chars", type=int, default=500, help="longest accepted query, in characters")
    p.add_argument("--max-k", type=int, default=100, help="largest accepted k (results per search)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="concurrent queries searched together in one batch (1: one at a time)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (info logs every request)")
    p.add_argument("--image-root", default=None, help=IMAGE_ROOT_HELP)
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a Host name clients may use, besides localhost, 127.0.0.1, ::1 and --host (repeat it "
                        "for several; '*' allows any). Other names are refused, against DNS rebinding")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on every API and image request (the page asks "
                        "for it once); default: the TBPS_TOKEN environment variable, which other users "
                        "cannot read in the process list")
    p.add_argument("--audit-log", default=None, metavar="FILE",
                   help="append one JSON line per request to FILE: time, client address, path, query, k, "
                        "result count, status (never the token)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a complete request head before it is disconnected")
    p.set_defaults(func=_cmd_serve)

    # visualize
    raw_fmt = type("RawDefaultsFormatter", (argparse.RawDescriptionHelpFormatter, fmt), {})
    p = sub.add_parser("visualize", formatter_class=raw_fmt, help="PNG grid of ranked images for text queries",
                       description="Draw, for text queries, the query and its top-k images with rank and score;\n"
                       "true matches framed green and others red where identities are known. Queries come\n"
                       "from a dataset split (captions drawn with --seed, or typed) ranked against its\n"
                       "gallery as tbps eval does, or are typed and searched in an index.",
                       epilog="examples:\n"
                       "  tbps visualize --checkpoint runs/demo/train/best.pt --out ranks.png\n"
                       "  tbps visualize --checkpoint best.pt --dataset cuhk-pedes --root /data/CUHK-PEDES \\\n"
                       "      --num-queries 6 --out ranks.png\n"
                       "  tbps visualize --index runs/demo/index --out ranks.png \\\n"
                       "      'a woman in a red coat' 'a man with a black backpack'")
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--checkpoint", default=None,
                   help="a tbps checkpoint (dataset mode; with --index: instead of the one it records)")
    p.add_argument("--dataset", default=None, help=DATASET_HELP + " (default: the checkpoint's)")
    p.add_argument("--root", default=None, help=ROOT_HELP + " (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=["test", "val", "train"], help="the split whose gallery is ranked")
    p.add_argument("--index", default=None, help="search this index (tbps index) instead of a dataset split")
    p.add_argument("--image-root", default=None, help="with --index: " + IMAGE_ROOT_HELP)
    p.add_argument("--num-queries", type=int, default=4, help="captions drawn from the split when none are typed")
    p.add_argument("--top-k", type=int, default=5, help="images per query (at most 20)")
    p.add_argument("--seed", type=int, default=0, help="which captions are drawn")
    p.add_argument("--rerank", default="on", choices=["on", "off"],
                   help="index mode: re-rank the shortlist with the method's fine-grained similarity")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("queries", nargs="*", metavar="QUERY", help="query texts (optional with a dataset)")
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser("train-detector", formatter_class=fmt,
                       help="train a HOG person detector on synthetic scenes (tbps synth --scenes)",
                       description="Train OpenCV's HOG people detector anew on the frames and true boxes of "
                       "scenes folders written by tbps synth --scenes (seconds on a CPU); the .npz it writes is "
                       "used with tbps index --footage ... --detector hog:FILE.")
    p.add_argument("--scenes", nargs="+", required=True, help="scenes folders (each with annotations.json)")
    p.add_argument("--out", required=True, help="the detector file to write (.npz)")
    p.set_defaults(func=_cmd_train_detector)

    # demo
    p = sub.add_parser("demo", formatter_class=fmt, help="the whole pipeline on synthetic data, on the CPU",
                       description="Synthesise SynthPEDES, train a small model on the CPU, evaluate it on "
                       "the test split and print a few searches. Leaves OUT/test_metrics.json, the "
                       "checkpoint and the data in OUT.")
    p.add_argument("--quick", action="store_true", help="a smaller dataset and budget (about 3 minutes)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--scenes", action="store_true",
                   help="camera footage: the quick demo's model, then synthetic videos of unseen people, HOG "
                        "person detection, an index of the crops with camera/time/box (OUT/footage_index) and "
                        "searches of it")
    p.add_argument("--checkpoint", default=None, help="with --scenes: use this model instead of training one")
    p.set_defaults(func=_cmd_demo)

    # import
    p = sub.add_parser("import", formatter_class=raw_fmt, help="turn a published checkpoint into a tbps checkpoint",
                       description="Write a tbps checkpoint from another project's model, for eval, index,\n"
                       "search, serve and visualize. The file is read without running code from it\n"
                       "(weights-only unpickling; a file that needs any other Python object is refused).\n"
                       "The architecture, image size and text length come from the tensors' shapes and\n"
                       "from --config when given; keys that do not fit are refused, naming them.\n"
                       "  irra      an IRRA-family best.pth (IRRA, and methods built on its code) -> irra\n"
                       "  textreid  a TextReID best.pth (RN50/RN101 + BiGRU) -> textreid; needs --vocab\n"
                       "  clip      CLIP weights (OpenAI .pt, open_clip file, Hugging Face folder) -> clip,\n"
                       "            zero-shot retrieval with CLIP's own towers and tokenizer",
                       epilog="examples:\n"
                       "  tbps import --from irra iira/best.pth --config iira/configs.yaml --out models/irra_cuhk.pt\n"
                       "  tbps import --from textreid best.pth --vocab cuhkpedes/clip_vocab_vit.npy \\\n"
                       "      --out models/textreid.pt\n"
                       "  tbps import --from clip ViT-B-16.pt --out models/clip_zeroshot.pt")
    p.add_argument("--from", dest="source", required=True, choices=["irra", "textreid", "clip"],
                   help="the project the file comes from")
    p.add_argument("file", help="their checkpoint (best.pth) or CLIP weights file/folder")
    p.add_argument("--config", default=None,
                   help="their run's config: IRRA's configs.yaml (image size, stride, losses, dataset) or "
                        "TextReID's yaml (INPUT.HEIGHT/WIDTH); default: read everything from the shapes")
    p.add_argument("--vocab", default=None,
                   help="textreid: the GRU's frozen word table, their clip_vocab_vit.npy (or CLIP ViT weights)")
    p.add_argument("--arch", default=None,
                   help="open_clip architecture name (e.g. ViT-B-16), when the shapes match none or several")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
                   help="clip: input size (default: the weights' own, e.g. 224 224; the position grid is "
                        "interpolated otherwise)")
    p.add_argument("--out", required=True, help="the tbps checkpoint to write (e.g. models/irra_cuhk.pt)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may stand anywhere on a `tbps train` line, also after options
    if extra and getattr(args, "command", None) == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tbps: interrupted", file=sys.stderr)
        return 130
    except TBPSError as exc:
        if args.debug:
            raise
        print(f"tbps: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"tbps: error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
