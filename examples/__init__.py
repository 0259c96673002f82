"""ClientApps to try Flowerbed against: `fedsim run --client-app examples.MODULE:ATTR`.

A regular package (not a namespace one): opacus 1.6 installs a top-level `examples` package of
its own into site-packages, which would otherwise shadow this folder.
"""
