import pytest

from datasets.catalog import (
    CATALOG,
    default_data_root,
    folder_info,
    get_dataset_info,
    prompt_names,
    real_name,
)
from utils.core.errors import ConfigError


def test_catalog_keys():
    assert list(CATALOG) == [
        "MVTec", "VisA", "BTAD", "MPDD", "MVTecAD2", "Brain", "Liver", "Retina",
        "Colon_clinicDB", "Colon_colonDB", "Colon_cvc300", "Colon_Kvasir", "DTD-Synthetic",
        "DAGM", "BrainMRI", "Br35H", "HeadCT", "ISIC", "Synthetic", "Folder",
    ]  # fmt: skip


def test_real_names_exact():
    assert real_name("MVTec", "metal_nut") == "metal nut which has four notched edges"
    assert real_name("VisA", "pcb1") == "dual ultrasonic distance sensor pcb module"
    assert real_name("BTAD", "01").endswith("energy field radiating outward.")
    assert real_name("MPDD", "bracket_white") == (
        "white, elongated triangular metal bracket with a smooth, matte finish"
    )
    assert real_name("Colon_Kvasir", "Kvasir") == "colon endoscopy image"
    assert real_name("Brain", "Brain") == "scan"


def test_real_name_fallbacks():
    assert real_name("MVTec", "my_widget") == "my widget"
    assert real_name("MyFactory", "solder_joint") == "solder joint"
    assert real_name("MVTec", "object") == "object"


def test_prompt_names_follow_the_class_order():
    names = prompt_names("MVTec")
    assert list(names) == list(get_dataset_info("MVTec").classes)
    assert names["metal_nut"] == "metal nut which has four notched edges"
    assert prompt_names(folder_info("solder_joint")) == {"solder_joint": "solder joint"}


def test_class_order_and_layout():
    assert get_dataset_info("VisA").classes[:3] == ("candle", "pcb3", "capsules")
    assert get_dataset_info("BTAD").classes == ("01", "02", "03")
    assert get_dataset_info("MPDD").layout == "mvtec"
    assert get_dataset_info("Colon_cvc300").classes == ("CVC-300",)
    assert get_dataset_info("Retina").domain == "Medical"
    assert len(get_dataset_info("Synthetic").classes) == 3
    assert default_data_root("VisA").as_posix() == "data/VisA"


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown data set 'Mvtec'.*MVTec, VisA"):
        get_dataset_info("Mvtec")
