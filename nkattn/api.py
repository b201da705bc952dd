def attention(): pass
def backend_status(): pass
