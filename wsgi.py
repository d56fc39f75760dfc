from bioproxy import create_app

app = create_app()
