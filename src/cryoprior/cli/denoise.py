"""Train a particle-image denoiser (CDAE, single DAE, DnCNN, robust GAN, DRVAE) or apply a trained one.

The command's --help text is :data:`HELP` (the module docstring's first line is its summary).
"""

from __future__ import annotations

import argparse
import json

from cryoprior.config import add_config_args, config_from_args
from cryoprior.io.star import OpticsFlags
from cryoprior.nn.cdae import CDAEConfig
from cryoprior.nn.cdae_generic import GenericCDAEConfig, train_generic
from cryoprior.nn.denoiser import PRECISIONS
from cryoprior.nn.dncnn import SHARED_FIELDS, DnCNNConfig
from cryoprior.nn.drvae import DRVAEConfig
from cryoprior.nn.gan import GANConfig
from cryoprior.nn.training import DEVICES
from cryoprior.workflows import denoise as pipeline

HELP = """Train a particle-image denoiser (CDAE, single DAE, DnCNN, robust GAN, DRVAE) or apply a trained one.

  train  --method cdae: fine-tune a cascade of 3 denoising autoencoders on --target towards
         k-NN means (no clean images needed): without --pretrain the shipped generic CDAE
         (many structures, CTF; the stack is phase-flipped and resampled to its 1.25 Å pixel);
         with --pretrain SIM_DIR (`cryoprior simulate --snr-levels 0.1 0.4 0.6 inf`) a cascade
         pre-trained there first;
         --method single-dae: one autoencoder, no pre-training (the paper's ablation);
         --method dncnn: DnCNN trained on the --pretrain pairs (SNR 0.1 -> clean), a baseline;
         --method gan: robust GAN, a ResNet autoencoder + (alpha,beta)-GAN / WGAN-GP / no GAN
         (--gan none: the lp autoencoder) + lambda * lp loss, trained on (noisy, reference) pairs
         from --pairs SIM_DIR or from --reference-map MAP.mrc and --target's poses and CTF;
         output in the references' intensity units;
         --method drvae: DRVAE + BSK-means++ on --target alone (--classes K): a variational
         ResNet autoencoder, rounds of balanced clustering and class-average pseudo-targets;
         also writes labels (rounds/), curves.json; apply gives the input's units.
         Writes RUN_DIR: model.pt, checkpoints/, config.yaml, losses.json/.png, metrics.json.
         --resume continues an interrupted run from its last checkpoints.
  pretrain-generic  train the generic CDAE (how the shipped one was made; src/cryoprior/data/cdae).
  apply  denoise a stack: OUT/denoised.mrcs and OUT/particles.star pointing at it; the images
         are estimates of the clean particles in the input's intensity units (--normalised:
         the network's per-image normalised output instead).

example:
  cryoprior simulate --structure 1hvr --box 64 --pixel-size 1.25 --n 4000 --views 4 \\
      --snr-levels 0.1 0.4 0.6 inf --out sim_pre
  cryoprior denoise train --method cdae --target particles.star --out run_cdae
  cryoprior denoise train --method cdae --pretrain sim_pre --target particles.star --out run_cdae_own
  cryoprior denoise apply --model run_cdae particles.star --out denoised/
  cryoprior denoise train --method gan --gan beta --alpha 0.5 --beta 0.5 --recon-loss l1 --lambda 10 \\
      --reference-map run_class001.mrc --target particles.star --out run_gan
  cryoprior denoise train --method drvae --target particles.star --classes 4 --out run_drvae
"""


def add_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter
    train = sub.add_parser("train", help="train a denoiser into a run folder", formatter_class=fmt,
                           description=HELP)
    train.add_argument("--method", choices=pipeline.METHODS, default="cdae", help="denoiser (default: cdae)")
    train.add_argument("--pretrain", metavar="SIM_DIR", help="simulated folder with SNR levels (cdae without it: "
                       "fine-tune the shipped generic CDAE)")
    train.add_argument("--target", metavar="IN.star", help="particle stack to fine-tune on (STAR/MRCS)")
    train.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to create")
    train.add_argument("--device", choices=DEVICES, default="auto", help="default: auto")
    train.add_argument("--resume", action="store_true", help="continue the run in an existing RUN_DIR")
    train.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")
    add_config_args(train.add_argument_group("CDAE / single DAE (and shared training flags)"), CDAEConfig)
    add_config_args(train.add_argument_group("DnCNN"), DnCNNConfig, skip=SHARED_FIELDS)
    add_config_args(train.add_argument_group("optics the target lacks"), OpticsFlags)
    gan = train.add_argument_group("robust GAN (--method gan)")
    gan.add_argument("--pairs", metavar="SIM_DIR", help="simulated folder of (noisy, clean) training pairs")
    gan.add_argument("--reference-map", metavar="MAP.mrc", help="consensus map: references are its projections "
                     "at the --target particles' poses with their CTF")
    add_config_args(gan, GANConfig, skip=("seed",))
    add_config_args(train.add_argument_group("DRVAE"), DRVAEConfig, skip=("seed",))

    generic = sub.add_parser("pretrain-generic", help="train the generic CDAE (as the shipped one)",
                             formatter_class=fmt, description=HELP)
    generic.add_argument("--out", required=True, metavar="DIR", help="folder for model.pt, model.json, checkpoints/")
    generic.add_argument("--device", choices=DEVICES, default="auto", help="default: auto")
    add_config_args(generic, GenericCDAEConfig)

    apply = sub.add_parser("apply", help="denoise a particle stack with a trained model", formatter_class=fmt,
                           description=HELP)
    apply.add_argument("input", metavar="IN.star", help="particle stack (STAR/MRCS)")
    apply.add_argument("--model", required=True, metavar="RUN_DIR", help="a `denoise train` run folder")
    apply.add_argument("--out", required=True, metavar="DIR", help="output folder to create")
    apply.add_argument("--device", choices=DEVICES, default="auto", help="default: auto")
    apply.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the model's)")
    apply.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=None,
                       help="histogram-equalise the output (default: as trained)")
    apply.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the model's")
    apply.add_argument("--normalised", action="store_true",
                       help="write the network's per-image normalised output (zero mean, unit variance) "
                       "instead of the clean-image estimate in the input's units")
    apply.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    add_config_args(apply.add_argument_group("optics the input lacks"), OpticsFlags)


def main(args: argparse.Namespace) -> int:
    if args.action == "pretrain-generic":
        out = train_generic(config_from_args(GenericCDAEConfig, args), args.out, args.device)
        print(f"wrote {out}/model.pt and {out}/model.json")
        return 0
    if args.action == "train":
        metrics = pipeline.train(
            args.method, args.out, pretrain=args.pretrain, target=args.target,
            cdae=config_from_args(CDAEConfig, args), dncnn=config_from_args(DnCNNConfig, args),
            drvae=config_from_args(DRVAEConfig, args),
            device=args.device, resume=args.resume, overwrite=args.overwrite,
            optics=config_from_args(OpticsFlags, args),
            gan=config_from_args(GANConfig, args), pairs=args.pairs, reference_map=args.reference_map,
        )
        print(json.dumps(metrics, indent=2))
        print(f"wrote {args.out}/model.pt")
        return 0
    out = pipeline.apply(
        args.model, args.input, args.out, device=args.device, batch_size=args.batch_size,
        equalize=args.equalize, precision=args.precision, overwrite=args.overwrite,
        units="normalised" if args.normalised else "input",
        optics=config_from_args(OpticsFlags, args),
    )
    print(f"wrote {out}/particles.star and {out}/denoised.mrcs")
    return 0
