"""Image-similarity search with an SCE encoder: the entry point of `python demo/app.py` and of the Hugging Face
Space (its `app_file`).

    python demo/app.py --model_name_or_path outputs/fashion-mnist-cpu [--dataset_name NAME_OR_PATH] [--port 7860]

On a Space, set the variables `SCE_MODEL_ID` (a Hub model id) and `SCE_DATASET` (a Hub dataset id; default the
Fashion-MNIST test split), and optionally `SCE_SPLIT`, `SCE_MAX_IMAGES`, `SCE_INDEX_TYPE`. `--help` lists every
flag; the code is `sce_hf.demo`.
"""

from sce_hf.demo import main


if __name__ == "__main__":
    main()
