"""farelab's own import-linter contract: a package uses another only through the names its
``__init__`` offers, never through a private module (``farelab.backend._store``).

The application on top — the command-line modules (``farelab._cli``, ``farelab._card``, …) and
the benchmarks that drive it (``farelab.bench``) — counts as one package, ``farelab``'s own;
within a package, private modules import each other freely.
"""

from __future__ import annotations

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck

__all__ = ["APPLICATION", "PublicNamesContract", "is_private_to", "package_of"]


#: Subpackages that belong to the application rather than to the library it is built from.
APPLICATION = frozenset({"bench"})


def package_of(module: str) -> str:
    """``farelab.card._files`` → ``farelab.card``; ``farelab._cli`` and ``farelab.bench._suite``
    → ``farelab``."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1].startswith("_") or parts[1] in APPLICATION:
        return parts[0]
    return ".".join(parts[:2])


def is_private_to(module: str, package: str) -> bool:
    """Whether ``module`` is a private part of ``package``."""
    rest = module[len(package) :].lstrip(".")
    return any(part.startswith("_") for part in rest.split(".") if part)


class PublicNamesContract(Contract):
    """Options: ``root`` (the top package, e.g. ``farelab``)."""

    root = fields.StringField()

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        """Every direct import that reaches into another package's private module."""
        root = str(self.root)
        broken: list[dict[str, object]] = []
        for importer in sorted(graph.find_descendants(root) | {root}):
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                if imported != root and not imported.startswith(root + "."):
                    continue
                theirs = package_of(imported)
                if package_of(importer) != theirs and is_private_to(imported, theirs):
                    details = graph.get_import_details(importer=importer, imported=imported)
                    lines = sorted({d["line_number"] for d in details})
                    broken.append({"importer": importer, "imported": imported, "lines": lines})
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        """One line per import that should use the package's public name."""
        for item in check.metadata["broken"]:
            lines = ", ".join(f"l.{n}" for n in item["lines"])
            theirs = package_of(str(item["imported"]))
            output.print_error(
                f"{item['importer']} -> {item['imported']} ({lines}): import it from {theirs}",
                bold=False,
            )
        output.new_line()
