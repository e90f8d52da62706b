"""Launcher of the crossmodal Gradio app, the same as ``crossmodal serve``.

    python app.py --run runs/openmoji
"""

from crossmodal.app import main

if __name__ == "__main__":
    main(prog="app.py")
