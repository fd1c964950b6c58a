"""Classify particle images into K classes without references (2D, unsupervised).

Images are normalised per image (zero mean, unit variance), then clustered on their pixels
(kmeans, hc = Ward, bsk = balanced sizes), up to in-plane rotation and --max-shift translation
(align-kmeans: poses in cpInplaneAngleDeg, cpAlignShiftXPx/YPx; averages of the aligned images), on an embedding (pca-kmeans, isomap-kmeans,
cae-kmeans) or after CDAE denoising (cdae-kmeans, cdae-hc, cdae-align-kmeans: --model RUN_DIR, or
trained here from data simulated from --pretrain-structure), or by drvae-bsk (DRVAE + BSK-means++:
a variational ResNet autoencoder trained on the stack itself, in rounds with balanced clustering;
its run goes to OUT/drvae/, or to --model RUN_DIR, where a rerun resumes it). Writes OUT/particles.star (input rows
+ rlnClassNumber, class 1 the largest), class_averages.mrcs/.star (raw-image averages), config.yaml, and
metrics.json (F1, accuracy, NMI, ARI) when the input carries cpViewLabel/cpConformationLabel.

example:
  cryoprior classify sim/particles.star --classes 4 --method pca-kmeans --out classes/
  cryoprior classify particles.star --classes 10 --method cdae-kmeans --model cdae_run/ --out c10/
  cryoprior classify particles.star --classes 4 --method cdae-hc --pretrain-structure 1ake --out c4/
  cryoprior classify particles.star --classes 20 --method align-kmeans --max-shift 3 --out c20/
  cryoprior classify particles.star --classes 4 --method drvae-bsk --out c4_drvae/
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from cryoprior.config import add_config_args, config_from_args
from cryoprior.io.star import OpticsFlags
from cryoprior.nn.drvae import DRVAEConfig
from cryoprior.workflows.classify import DRVAE_SHARED, ClassifyConfig, run_classify


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="particles (.star, .mrcs or .mrc)")
    classes = next(f for f in dataclasses.fields(ClassifyConfig) if f.name == "classes")
    parser.add_argument(
        "--classes", type=int, required=True, metavar="K", dest="classes", help=classes.metadata["help"]
    )
    add_config_args(parser, ClassifyConfig, skip=("classes",))
    add_config_args(parser.add_argument_group("optics the input lacks"), OpticsFlags)
    add_config_args(parser.add_argument_group("drvae-bsk"), DRVAEConfig, skip=DRVAE_SHARED)
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def main(args: argparse.Namespace) -> int:
    drvae = None
    if args.method == "drvae-bsk":
        drvae = config_from_args(DRVAEConfig, args, **{name: getattr(args, name) for name in DRVAE_SHARED})
    config = config_from_args(ClassifyConfig, args, drvae=drvae)
    result = run_classify(args.input, args.out, config, argv=sys.argv, overwrite=args.overwrite,
                          optics=config_from_args(OpticsFlags, args))
    sizes = ", ".join(str(s) for s in result["class_sizes"])
    line = f"{result['n']} particles in {config.classes} classes ({sizes}) → {result['out']}/particles.star"
    if result["metrics"] is not None:
        m = result["metrics"]
        line += f"; vs {m['label_column']}: F1 {m['f1']:.3f}, accuracy {m['accuracy']:.3f}, ARI {m['ari']:.3f}"
    print(line)
    return 0
