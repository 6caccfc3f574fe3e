# ml_client.py
import requests
import json
import time
import numpy as np

class MLClient:
    def __init__(self, base_url="http://localhost:8080"):
        self.base_url = base_url
        self.session = requests.Session()

    def predict(self, model_name, features, use_cache=True):
        """
        Make a single prediction.
        
        Parameters
        ----------
        model_name : str
            Name of the model
        features : list
            Feature values
        use_cache : bool
            Whether to use cache
            
        Returns
        -------
        dict : Prediction result
        """
        url = f"{self.base_url}/api/v1/predict"

        payload = {
            "model_name": model_name,
            "features": features,
            "use_cache": use_cache
        }

        start_time = time.time()
        response = self.session.post(url, json=payload)
        latency = (time.time() - start_time) * 1000  # ms

        if response.status_code == 200:
            result = response.json()
            result['latency_ms'] = latency
            return result
        else:
            raise Exception(f"Prediction failed: {response.text}")

    def batch_predict(self, model_name, features_list):
        """
        Make batch predictions.
        
        Parameters
        ----------
        model_name : str
            Name of the model
        features_list : list of lists
            List of feature vectors
            
        Returns
        -------
        list : List of predictions
        """
        url = f"{self.base_url}/api/v1/batch_predict"

        payload = {
            "model_name": model_name,
            "features_batch": features_list
        }

        response = self.session.post(url, json=payload)

        if response.status_code == 200:
            return response.json()
        else:
            raise Exception(f"Batch prediction failed: {response.text}")

    def get_model_info(self, model_name):
        """Get model metadata."""
        url = f"{self.base_url}/api/v1/models/{model_name}"
        response = self.session.get(url)

        if response.status_code == 200:
            return response.json()
        else:
            raise Exception(f"Failed to get model info: {response.text}")

    def health_check(self):
        """Check API health."""
        url = f"{self.base_url}/health"
        response = self.session.get(url)
        return response.json()

    def get_metrics(self):
        """Get API metrics."""
        url = f"{self.base_url}/metrics"
        response = self.session.get(url)
        return response.text

# Usage example
if __name__ == "__main__":
    client = MLClient(base_url="http://localhost:8080")

    # 1. Health check
    print("=== Health Check ===")
    health = client.health_check()
    print(json.dumps(health, indent=2))

    # 2. Single prediction
    print("\n=== Single Prediction ===")
    result = client.predict(
        model_name="iris_classifier",
        features=[5.1, 3.5, 1.4, 0.2]
    )
    print(f"Prediction: {result['prediction']}")
    print(f"Probability: {result['probability']}")
    print(f"Latency: {result['latency_ms']:.2f}ms")
    print(f"Cached: {result.get('from_cache', False)}")

    # 3. Batch prediction
    print("\n=== Batch Prediction ===")
    features_batch = [
        [5.1, 3.5, 1.4, 0.2],
        [6.2, 2.9, 4.3, 1.3],
        [7.3, 2.9, 6.3, 1.8]
    ]
    batch_results = client.batch_predict("iris_classifier", features_batch)
    print(f"Predictions: {batch_results['predictions']}")
    print(f"Total latency: {batch_results['total_latency_ms']:.2f}ms")

    # 4. Model info
    print("\n=== Model Information ===")
    model_info = client.get_model_info("iris_classifier")
    print(json.dumps(model_info, indent=2))

    # 5. Performance test
    print("\n=== Performance Test (1000 requests) ===")
    latencies = []
    for _ in range(1000):
        result = client.predict("iris_classifier", [5.1, 3.5, 1.4, 0.2])
        latencies.append(result['latency_ms'])

    print(f"Mean latency: {np.mean(latencies):.2f}ms")
    print(f"P50 latency: {np.percentile(latencies, 50):.2f}ms")
    print(f"P95 latency: {np.percentile(latencies, 95):.2f}ms")
    print(f"P99 latency: {np.percentile(latencies, 99):.2f}ms")
    print(f"Max latency: {np.max(latencies):.2f}ms")
