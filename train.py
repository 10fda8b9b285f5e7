"""Train the projector (stage 1) or projector + LLM / LoRA (stage 2). See revision/train.py and script/train/.

    python train.py --model_name_or_path LLM --data_path data.json --embed_folder STORE --output_dir OUT \
        [--tune_mm_mlp_adapter] [--lora_enable] [--deepspeed script/deepspeed/zero2.json] ...
"""
from data_utils import folder_path
from revision.train import main

if __name__ == "__main__":
    main(default_embed_folder=folder_path)
