from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import COMMANDS

EDIT_HELP = {
    "add": "add --tags to the selected captions (--front to put them first)",
    "remove": "remove --tags (--regex: patterns matching whole tags)",
    "replace": "replace --find with --replace_with, per tag or in the whole caption (--scope)",
    "move_front": "move --tags to the front, in the order given",
    "dedupe": "remove repeated tags",
    "sort": "sort tags (--sort_by alphabetical|frequency|length|tokens, --keep_first N)",
    "truncate": "drop tags from the end until the caption fits --max_tokens CLIP tokens",
}


@COMMANDS.register("tags")
def register(sub: argparse._SubParsersAction) -> None:
    from dataset_tools.editor.config import TagsConfig

    p = sub.add_parser("tags", help="edit the captions of a dataset in bulk, with undo",
                       description="Filters (--all_of / --any_of / --none_of) choose the images. Every edit is "
                                   "journalled and the original captions are backed up in DIR/.loratrain/.")
    ops = p.add_subparsers(dest="tags_op", required=True)
    helps = {"list": "tag frequency table of the selected images", "set": "set one image's caption (--image, --caption)",
             "undo": "undo the newest edit (or tagging run), restoring byte-identical captions",
             "history": "list the edits that can be undone", **EDIT_HELP}
    for name, text in helps.items():
        op = ops.add_parser(name, help=text, description=text)
        TagsConfig.add_arguments(op)
        op.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dataset_tools.editor.caption_set import CaptionSet
    from dataset_tools.editor.config import TagsConfig
    from dataset_tools.editor.ops import apply_edit
    from dataset_tools.journal import Journal

    cfg = TagsConfig.from_args(args)
    op = args.tags_op
    if op == "undo":
        res = Journal(cfg.dataset_dir).undo(force=cfg.force)
        print(f"undid '{res.header.get('description')}' ({res.header.get('time')}): {res.restored} of {res.files} file(s) restored")
        return 0
    if op == "history":
        hist = Journal(cfg.dataset_dir).history()
        if cfg.json:
            print(json.dumps(hist, indent=2))
        for h in hist:
            print(f"{h['id']}  {h['time']}  {h['op']:10s} {h['files']:5d} file(s)  {h['description']}")
        if not hist:
            print("no edits to undo")
        return 0
    captions = CaptionSet.load(cfg.dataset_dir, cfg.caption_extension, cfg.recursive, cfg.separator)
    if op == "list":
        chosen = captions.select(cfg.all_of, cfg.any_of, cfg.none_of)
        freq = CaptionSet.frequency(chosen).most_common(cfg.top or None)
        if cfg.json:
            print(json.dumps({"images": len(chosen), "tags": dict(freq)}, indent=2))
            return 0
        print(f"{len(chosen)} of {len(captions.entries)} image(s) selected")
        for tag, n in freq:
            print(f"{n:6d}  {n / max(1, len(chosen)):6.1%}  {tag}")
        return 0
    if op == "set":
        if not cfg.image:
            raise ValueError("tags set: give --image and --caption")
        changed = [captions.set_caption(cfg.image, cfg.caption)]
        description = f"set caption of {Path(cfg.image).name}"
    else:
        changed = apply_edit(captions, op, cfg)
        description = f"{op} {' '.join(cfg.tags) or cfg.find} on {len(changed)} caption(s)"
    for image, before, after in changed[:5]:
        print(f"{image}\n  - {before}\n  + {after}")
    if len(changed) > 5:
        print(f"... and {len(changed) - 5} more")
    if cfg.dry_run:
        print(f"dry run: {len(changed)} caption(s) would change")
        return 0
    written = captions.save(op, description)
    print(f"{written} caption(s) written; `loratrain tags undo {cfg.dataset_dir}` reverts this")
    return 0
