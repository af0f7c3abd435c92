from twisted.application.service import ServiceMaker

getcertd = ServiceMaker("getcertd", "getcertd.tap", "Certificate enrollment appliance for IPsec (SCEP over HTTPS, RADIUS)", "getcertd")
