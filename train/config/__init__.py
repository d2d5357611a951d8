"""The run configuration, by job: schema.py (the typed dataclasses and their YAML form, a leaf every module
reads), validation.py (checks across fields) and loading.py (files, presets, key=value overrides and the
model.init_from shape merge).

Import names from the module that owns them. Nothing is re-exported here: importing any module of this
package runs this file first, the checkpoint writer and the weights reader import the schema, and loading
reads weights for model.init_from's shape, so a re-export of loading here would close a circle.
"""
