"""The five classes and the folder names that mean them."""

CLASSES = ['daisy', 'dandelion', 'rose', 'sunflower', 'tulip']

# Folder spellings seen in the wild (Kaggle "Flowers Recognition", TensorFlow `flower_photos`).
_ALIASES = {'daisies': 'daisy', 'dandelions': 'dandelion', 'roses': 'rose',
            'sunflowers': 'sunflower', 'tulips': 'tulip'}


def normalize_class_name(folder_name: str) -> str | None:
    """`'Roses'` -> `'rose'`; None for a folder that names no class."""
    name = folder_name.strip().lower()
    name = _ALIASES.get(name, name)
    return name if name in CLASSES else None
