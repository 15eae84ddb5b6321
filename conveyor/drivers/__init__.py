"""Drivers: the contract (``base``), the kind table (``kinds``), the option records
(``options/``) and one module or package per backend, imported only when used."""
