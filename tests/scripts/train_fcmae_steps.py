"""Run a few FCMAE Trainer steps on fixed data and save the final weights (used by the DDP test).

python train_fcmae_steps.py OUT PER_DEVICE_BATCH GRAD_ACCUM   (under torchrun for several processes)
"""

import sys

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.training import FCMAECollator, fcmae_loss, finish_distributed_run


class FixedImages(torch.utils.data.Dataset):
    """Eight images, each with its own mask noise, so every run sees the same masks."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(8, 3, 64, 64, generator=generator)
        self.noise = torch.rand(8, 4, generator=generator)

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "noise": self.noise[index]}


def main(output: str, per_device_batch: int, grad_accum: int) -> None:
    config = ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], decoder_hidden_size=16)
    torch.manual_seed(0)
    model = ConvNextV2ForMaskedImageModeling(config)
    args = TrainingArguments(
        output_dir=output + ".run",
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=grad_accum,
        max_steps=2,
        learning_rate=5.0,
        optim="sgd",  # plain SGD: unlike Adam, its update shows any error in the loss scale
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_drop_last=True,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        seed=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # the same examples per step whatever the number of processes
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=FixedImages(),
        data_collator=FCMAECollator(config, image_size=64),
        compute_loss_func=fcmae_loss,
    )
    result = trainer.train()
    if trainer.is_world_process_zero():
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        state["train_loss"] = torch.tensor([result.training_loss])
        save_file(state, output)
    finish_distributed_run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
