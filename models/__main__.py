"""List the registered architectures: ``python -m models``."""

from models import list_models
from models.registry import TORCHVISION_PREFIX

if __name__ == "__main__":
    for name in list_models():
        print(name)
    print(f"{TORCHVISION_PREFIX}<name>  (any torchvision classifier, random weights)")
