from __future__ import annotations

import argparse

from ..cli import COMMANDS

CONSENT = "Use only faces of people who have given their consent."


@COMMANDS.register("face")
def register(sub: argparse._SubParsersAction) -> None:
    from facetrain.extract.config import ExtractConfig, SortConfig
    from facetrain.train.config import FaceTrainConfig

    p = sub.add_parser("face", help="face autoencoder: extract, sort, train (DF / LIAE), grow, export",
                       description="DeepFaceLab-style face tools. " + CONSENT)
    ops = p.add_subparsers(dest="face_op", required=True)
    ex = ops.add_parser("extract", help="detect, landmark and align faces from images or a video")
    ExtractConfig.add_arguments(ex)
    ex.set_defaults(run=run_extract)
    so = ops.add_parser("sort", help="sort a faceset by yaw, pitch, blur, hist or identity")
    SortConfig.add_arguments(so)
    so.set_defaults(run=run_sort)
    tr = ops.add_parser("train", help="train a DF / LIAE face model (SAEHD options)")
    FaceTrainConfig.add_arguments(tr)
    tr.set_defaults(run=run_train)
    gr = ops.add_parser("grow", help="continue a model at a higher resolution (progressive growth)")
    gr.add_argument("model", help="the model's .safetensors file")
    gr.add_argument("--resolution", type=int, required=True)
    gr.set_defaults(run=run_grow)
    exo = ops.add_parser("export", help="export to ONNX in the DeepFaceLab .dfm contract")
    exo.add_argument("model", help="the model's .safetensors file")
    exo.add_argument("output", help="the .onnx (or .dfm) file to write")
    exo.set_defaults(run=run_export)
    im = ops.add_parser("import-dfl", help="convert DeepFaceLab DFLJPG faces (pickled metadata, checked by an allow list)")
    im.add_argument("input", help="folder of DFLJPG faces")
    im.add_argument("output", help="folder for the converted faces")
    im.set_defaults(run=run_import)


def run_extract(args: argparse.Namespace) -> int:
    from facetrain import require_extras

    require_extras("cv2", "dlib")
    from facetrain.extract.extract import ExtractConfig, extract_faces

    from ..common.progress import TqdmReporter, ctrl_c_stop

    cfg = ExtractConfig.from_args(args)
    res = extract_faces(cfg, TqdmReporter(cfg.quiet), ctrl_c_stop("after this frame"))
    print(f"{len(res.faces)} face(s) from {res.frames} frame(s) in {cfg.output_dir}; {len(res.no_face)} frame(s) without a face, "
          f"{len(res.unreadable)} unreadable")
    for line in res.unreadable[:10]:
        print(f"  {line}")
    return 0


def run_sort(args: argparse.Namespace) -> int:
    from facetrain import require_extras

    require_extras("cv2", "dlib")
    from facetrain.extract.sort import SortConfig, sort_faceset

    from ..common.progress import TqdmReporter

    cfg = SortConfig.from_args(args)
    res = sort_faceset(cfg, TqdmReporter())
    for path, score in res.order[:10] if cfg.dry_run else []:
        print(f"{score:9.4f}  {path}")
    print(f"sorted {len(res.order)} face(s) by {cfg.by}" + (f"; {len(res.moved_other)} other person(s) moved to _other/" if res.moved_other else ""))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from facetrain import require_extras

    require_extras("cv2")
    from facetrain.train.config import FaceTrainConfig
    from facetrain.train.trainer import train_faces

    from ..common.progress import TqdmReporter, ctrl_c_stop

    cfg = FaceTrainConfig.from_args(args)
    print(CONSENT)
    res = train_faces(cfg, TqdmReporter(cfg.quiet), ctrl_c_stop("after this iteration and saving"))
    last = res.history[-1] if res.history else {}
    print(f"iteration {res.iteration}: src loss {last.get('src_loss', float('nan')):.4f}, dst loss {last.get('dst_loss', float('nan')):.4f}")
    print(f"model: {res.model_path}\npreview: {res.preview_path}\nTensorBoard: {cfg.model_dir}/logs")
    return 130 if res.stopped else 0


def run_grow(args: argparse.Namespace) -> int:
    from facetrain import require_extras

    require_extras("cv2")
    from facetrain.grow import grow_model

    res = grow_model(args.model, args.resolution)
    print(f"{res.model_path}: {len(res.kept)} tensors kept, {len(res.reinitialised)} re-initialised "
          f"({', '.join(sorted({k.split('.')[0] + '.' + k.split('.')[1] for k in res.reinitialised}))}); train on at the new resolution")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from facetrain import require_extras

    require_extras("cv2", "onnx")
    from facetrain.export import export_onnx

    print(f"wrote {export_onnx(args.model, args.output)} (input in_face:0, outputs out_celeb_face, out_celeb_face_mask, out_face_mask)")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from facetrain import require_extras

    require_extras("cv2")

    from facetrain.faceset import FacesetError, import_dfl_file

    src, dst = Path(args.input), Path(args.output)
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")) if src.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no DFLJPG files in {src}")
    ok, refused = 0, []
    for f in files:
        try:
            import_dfl_file(f, dst / f.name)
            ok += 1
        except FacesetError as e:
            refused.append(str(e))
    print(f"imported {ok} face(s) into {dst}; refused {len(refused)}")
    for line in refused:
        print(f"  {line}")
    return 1 if refused else 0
