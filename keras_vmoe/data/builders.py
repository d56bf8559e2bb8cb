"""TFDS builders for the bundled datasets (no download: read from disk).

Importing this module registers `animal_mnist` and `digits` with TFDS, so
`tfds.builder("animal_mnist", data_dir=...)` and `tfds.load` work too. Both
builders read their examples from `keras_vmoe.data.bundled` (installed wheel
files and scikit-learn's bundled data), so preparing them never reaches the
network; the split is documented there.
"""

import tensorflow_datasets as tfds

from keras_vmoe.data import bundled


class _BundledBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose examples come from `bundled.bundled_arrays(NAME, ...)`.

    Subclasses set `NAME`, `IMAGE_SHAPE`, `CLASSES`, `DESCRIPTION` and
    `HOMEPAGE`; preparing them never downloads anything.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (keras_vmoe)."}

    def _info(self):
        return self.dataset_info_from_configs(
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=self.IMAGE_SHAPE),
                    "label": tfds.features.ClassLabel(names=list(self.CLASSES)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        images, labels = bundled.bundled_arrays(self.NAME, split)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield i, {"image": image, "label": int(label)}


class AnimalMnist(_BundledBuilder):
    """Animal-MNIST: 10,000 real 28x28 grayscale animal silhouettes.

    Ten classes (bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep,
    zebra), 1,000 images each, from the `animal-mnist` 0.4 wheel. Split:
    8,000 train / 2,000 test, as the wheel's own benchmark draws it
    (`train_test_split(test_size=0.2, random_state=42)`). Features:
    `image` uint8 `(28, 28, 1)`, `label` `ClassLabel` (10 names).

    Args:
        data_dir: str. Where to prepare the dataset. Defaults to the TFDS
            default (`~/tensorflow_datasets` or `$TFDS_DATA_DIR`).

    Example:

    ```python
    builder = AnimalMnist(data_dir="/tmp/tfds")
    builder.download_and_prepare()  # local: reads the installed wheel
    ds = builder.as_dataset(split="train")
    ```
    """

    NAME = "animal_mnist"
    IMAGE_SHAPE = (28, 28, 1)
    CLASSES = bundled.ANIMAL_MNIST_CLASSES
    DESCRIPTION = (
        "Animal silhouettes in the format of MNIST (animal-mnist 0.4 wheel). "
        "Seeded 80/20 split, random_state=42."
    )
    HOMEPAGE = "https://pypi.org/project/animal-mnist/"


class Digits(_BundledBuilder):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).

    Pixel values 0..16 are rescaled to uint8 0..255 (`round(v * 255 / 16)`).
    Split: 1,437 train / 360 test (`train_test_split(test_size=0.2,
    random_state=42)`). Features: `image` uint8 `(8, 8, 1)`, `label`
    `ClassLabel` ("0".."9").

    Args:
        data_dir: str. Where to prepare the dataset. Defaults to the TFDS
            default (`~/tensorflow_datasets` or `$TFDS_DATA_DIR`).

    Example:

    ```python
    builder = Digits(data_dir="/tmp/tfds")
    builder.download_and_prepare()  # local: reads scikit-learn's files
    ds = builder.as_dataset(split="test")
    ```
    """

    NAME = "digits"
    IMAGE_SHAPE = (8, 8, 1)
    CLASSES = bundled.DIGITS_CLASSES
    DESCRIPTION = (
        "sklearn.datasets.load_digits, rescaled to 0..255. Seeded 80/20 "
        "split, random_state=42."
    )
    HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html"


BUILDERS = {"animal_mnist": AnimalMnist, "digits": Digits}
