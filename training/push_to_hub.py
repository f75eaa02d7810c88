#!/usr/bin/env python
"""Upload an exported SCE model folder to the Hugging Face Hub, with its model card re-rendered.

    python training/push_to_hub.py --model_dir outputs/fashion-mnist-cpu --hub_model_id ORG/NAME --dry_run
    python training/push_to_hub.py --model_dir outputs/fashion-mnist-cpu --hub_model_id ORG/NAME [--hub_private_repo]
        [--revision BRANCH] [--commit_message MSG] [--hub_token T] [--include_pretraining]

The upload is one commit of an allowlist: `config.json`, `model.safetensors`, `preprocessor_config.json`, the
remote-code files, `eval_results.json`, `training_args.json` / `conversion.json` and `README.md` (plus
`pretraining/` with --include_pretraining), never `checkpoints/`. The card (`model_cards/template.md`) is rendered
for --hub_model_id from the folder's records; `--dry_run` prints the files and the card and uploads nothing. A push
that fails (offline, no token, refused, network) prints one line, exits with status 1 and leaves the folder as it
was; after a successful push the folder's generated README is the card that was pushed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sce_hf.cli import add_hub_args
from sce_hf.hub import PushError, prepare_push, push_to_hub


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Upload an exported SCE model folder to the Hugging Face Hub.")
    parser.add_argument("--model_dir", type=str, required=True,
                        help="The exported folder (training or conversion output).")
    add_hub_args(parser, push_flag=False)  # pushing is what this script does
    parser.add_argument("--revision", type=str, default=None,
                        help="Branch to commit to (created when missing; default main).")
    parser.add_argument("--commit_message", type=str, default="Upload SCE encoder", help="Message of the commit.")
    parser.add_argument("--include_pretraining", action="store_true",
                        help="Also upload pretraining/ (projector, predictor, teacher, queue) for continued training.")
    parser.add_argument("--dry_run", action="store_true", help="Print the files and the rendered card; upload nothing.")
    args = parser.parse_args(argv)
    if args.hub_model_id is None:
        parser.error("--hub_model_id ORG/NAME is required.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        if args.dry_run:
            uploads, card = prepare_push(args.model_dir, args.hub_model_id, args.include_pretraining)
            visibility = "private" if args.hub_private_repo else "public"
            print(f"Dry run: would push to {args.hub_model_id} ({visibility}, revision {args.revision or 'main'}, "
                  f"message {args.commit_message!r}) these {len(uploads)} files:")
            for path, source in uploads:
                size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
                note = "  (card rendered for this push)" if isinstance(source, bytes) else ""
                print(f"  {path}  {size:,} bytes{note}")
            if card is None:
                print("\nREADME.md is hand-written (no generated-card marker): it is uploaded as it is.")
            else:
                print("\n----- README.md -----")
                print(card, end="")
            return 0
        url = push_to_hub(
            args.model_dir, args.hub_model_id, private=args.hub_private_repo, revision=args.revision,
            commit_message=args.commit_message, token=args.hub_token, include_pretraining=args.include_pretraining,
        )
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {args.model_dir} to {args.hub_model_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
